#include "common/train/loss_plot.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace mdi {

namespace {
constexpr int kLeft = 40, kRight = 10, kTop = 10, kBottom = 30;

struct Rgb {
  uint8_t r, g, b;
};

class Canvas {
 public:
  Canvas() : pixels_(static_cast<size_t>(kLossPlotWidth * kLossPlotHeight) * 3, 255) {}
  void set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= kLossPlotWidth || y >= kLossPlotHeight) return;
    uint8_t* p = &pixels_[(static_cast<size_t>(y) * kLossPlotWidth + static_cast<size_t>(x)) * 3];
    p[0] = c.r, p[1] = c.g, p[2] = c.b;
  }
  // Bresenham, two pixels thick.
  void line(int x0, int y0, int x1, int y1, Rgb c) {
    const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    for (int err = dx + dy;;) {
      set(x0, y0, c), set(x0, y0 + 1, c);
      if (x0 == x1 && y0 == y1) break;
      const int e2 = 2 * err;
      if (e2 >= dy) err += dy, x0 += sx;
      if (e2 <= dx) err += dx, y0 += sy;
    }
  }
  void square(int x, int y, int half, Rgb c) {
    for (int i = -half; i <= half; ++i)
      for (int j = -half; j <= half; ++j) set(x + i, y + j, c);
  }
  // Rows of RGB, each led by PNG filter byte 0 (none).
  std::string scanlines() const {
    std::string out;
    for (int y = 0; y < kLossPlotHeight; ++y) {
      out.push_back('\0');
      const auto* row = &pixels_[static_cast<size_t>(y) * kLossPlotWidth * 3];
      out.append(reinterpret_cast<const char*>(row), static_cast<size_t>(kLossPlotWidth) * 3);
    }
    return out;
  }

 private:
  std::vector<uint8_t> pixels_;
};

uint32_t crc32(const std::string& bytes) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : bytes) c = table[(c ^ b) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void put_be32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((v >> shift) & 0xFF));
}

void chunk(std::string& png, const char* type, const std::string& data) {
  put_be32(png, static_cast<uint32_t>(data.size()));
  const std::string typed = std::string(type, 4) + data;
  png += typed;
  put_be32(png, crc32(typed));
}

// A zlib stream of stored deflate blocks.
std::string zlib_stored(const std::string& data) {
  std::string out = "\x78\x01";
  uint32_t a = 1, b = 0;
  for (unsigned char c : data) a = (a + c) % 65521, b = (b + a) % 65521;
  for (size_t pos = 0; pos < data.size() || pos == 0;) {
    const size_t n = std::min<size_t>(65535, data.size() - pos);
    const bool last = pos + n == data.size();
    out.push_back(last ? '\x01' : '\x00');
    out.push_back(static_cast<char>(n & 0xFF)), out.push_back(static_cast<char>(n >> 8));
    out.push_back(static_cast<char>(~n & 0xFF)), out.push_back(static_cast<char>((~n >> 8) & 0xFF));
    out.append(data, pos, n);
    pos += n;
    if (last) break;
  }
  put_be32(out, (b << 16) | a);
  return out;
}
}  // namespace

std::string loss_curve_png(const std::map<int64_t, double>& train, const std::map<int64_t, double>& validation) {
  const Rgb black{0, 0, 0}, grey{190, 190, 190}, blue{31, 119, 180}, red{214, 39, 40};
  int64_t first = train.empty() ? 1 : train.begin()->first, last = first + 1;
  double top = 1e-9;
  for (const auto* series : {&train, &validation})
    for (auto& [step, loss] : *series) {
      first = std::min(first, step), last = std::max(last, step);
      if (std::isfinite(loss)) top = std::max(top, loss);
    }
  const int plot_w = kLossPlotWidth - kLeft - kRight, plot_h = kLossPlotHeight - kTop - kBottom;
  auto x = [&](int64_t step) { return kLeft + static_cast<int>(std::lround(double(plot_w) * double(step - first) / double(last - first))); };
  auto y = [&](double loss) { return kTop + plot_h - static_cast<int>(std::lround(double(plot_h) * std::clamp(loss / top, 0.0, 1.0))); };

  Canvas canvas;
  for (int i = 1; i <= 5; ++i) {
    const int gy = kTop + plot_h - plot_h * i / 5, gx = kLeft + plot_w * i / 5;
    canvas.line(kLeft, gy, kLeft + plot_w, gy, grey);
    canvas.line(gx, kTop, gx, kTop + plot_h, grey);
    canvas.line(kLeft - 5, gy, kLeft, gy, black);
    canvas.line(gx, kTop + plot_h, gx, kTop + plot_h + 5, black);
  }
  canvas.line(kLeft, kTop + plot_h, kLeft + plot_w, kTop + plot_h, black);
  canvas.line(kLeft, kTop, kLeft, kTop + plot_h, black);
  const std::pair<const int64_t, double>* prev = nullptr;
  for (auto& point : train) {
    if (prev) canvas.line(x(prev->first), y(prev->second), x(point.first), y(point.second), blue);
    else canvas.set(x(point.first), y(point.second), blue);
    prev = &point;
  }
  for (auto& [step, loss] : validation) canvas.square(x(step), y(loss), 2, red);

  std::string png = "\x89PNG\r\n\x1a\n";
  std::string header;
  put_be32(header, kLossPlotWidth), put_be32(header, kLossPlotHeight);
  header += std::string("\x08\x02\x00\x00\x00", 5);  // 8-bit RGB, deflate, no filter choice, no interlace
  chunk(png, "IHDR", header);
  chunk(png, "IDAT", zlib_stored(canvas.scanlines()));
  chunk(png, "IEND", "");
  return png;
}

}  // namespace mdi
