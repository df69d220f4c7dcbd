#pragma once
// The loss curve of a training run as a PNG image: the training loss of every step
// (a blue line) and the validation losses (red squares), on axes from the first step
// and loss 0 to the last step and the largest loss, with five ticks on each. Written
// without an image library: the pixels go in stored (uncompressed) deflate blocks.
#include <cstdint>
#include <map>
#include <string>

namespace mdi {

inline constexpr int kLossPlotWidth = 480, kLossPlotHeight = 320;

// The bytes of the PNG file. Empty `train`: blank axes.
std::string loss_curve_png(const std::map<int64_t, double>& train, const std::map<int64_t, double>& validation);

}  // namespace mdi
