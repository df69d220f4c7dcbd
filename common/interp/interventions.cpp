#include "common/interp/interventions.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "common/wire/json_excerpt.hpp"

namespace mdi {

namespace {

[[noreturn]] void fail(const std::string& where, const std::string& problem) { throw InterpretabilityError(where + problem); }

int64_t parse_int(const std::string& text, const std::string& what) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos)
    throw InterpretabilityError(what + ": \"" + text + "\" is not a layer (a number, a range a-b, \"embed\" or \"all\")");
  try {
    return std::stoll(text);
  } catch (const std::exception&) {
    throw InterpretabilityError(what + ": \"" + text + "\" is out of range");
  }
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

int64_t layers_end(const ModelBounds& b) { return b.layer_end < 0 ? b.n_layers : b.layer_end; }

// A layer value ("embed" or an integer) checked against the model and the node's layers.
int64_t parse_layer(const nlohmann::json& v, const ModelBounds& b, const std::string& where) {
  int64_t layer;
  if (v.is_string() && v.get<std::string>() == "embed")
    layer = kEmbedLayer;
  else if (v.is_number_integer())
    layer = v.get<int64_t>();
  else
    fail(where, " must be \"embed\" or a layer number 0.." + std::to_string(b.n_layers - 1) + ", got " + json_excerpt(v));
  if (layer != kEmbedLayer && (layer < 0 || layer >= b.n_layers))
    fail(where, " " + std::to_string(layer) + " is outside 0.." + std::to_string(b.n_layers - 1) + " (the model has " +
                    std::to_string(b.n_layers) + " layers)");
  const int64_t end = layers_end(b);
  if (layer < b.layer_begin || layer >= end)
    fail(where, " " + layer_label(layer) + " is not held by this node (layers [" + std::to_string(b.layer_begin) + ", " +
                    std::to_string(end) + "))");
  return layer;
}

std::vector<int64_t> parse_index_list(const nlohmann::json& v, const std::string& where, int64_t limit, const std::string& limit_name) {
  if (!v.is_array()) fail(where, " must be a list of integers");
  std::set<int64_t> out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_number_integer()) fail(where + "[" + std::to_string(i) + "]", " must be an integer, got " + json_excerpt(v[i]));
    const int64_t x = v[i].get<int64_t>();
    if (x < 0 || (limit >= 0 && x >= limit))
      fail(where + "[" + std::to_string(i) + "]", " " + std::to_string(x) + " is outside 0.." +
                                                      (limit >= 0 ? std::to_string(limit - 1) + " (" + limit_name + ")" : "∞"));
    out.insert(x);
  }
  return {out.begin(), out.end()};
}

std::vector<float> inline_vector(const nlohmann::json& v, int64_t dim, const std::string& where) {
  if (static_cast<int64_t>(v.size()) != dim)
    fail(where, " has " + std::to_string(v.size()) + " values; the model's dim is " + std::to_string(dim));
  std::vector<float> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_number()) fail(where + "[" + std::to_string(i) + "]", " must be a number, got " + json_excerpt(v[i]));
    const double x = v[i].get<double>();
    if (!std::isfinite(x) || std::abs(x) > std::numeric_limits<float>::max())
      fail(where + "[" + std::to_string(i) + "]", " is not a finite float32");
    out.push_back(static_cast<float>(x));
  }
  return out;
}

Intervention parse_entry(const nlohmann::json& e, const ModelBounds& b, const std::string& where, const VectorLoader& loader,
                         const std::filesystem::path& base_dir) {
  if (!e.is_object()) fail(where, " must be an object {\"layer\", \"op\", ...}");
  static const std::set<std::string> known = {"layer", "op", "vector", "scale", "samples", "positions"};
  for (auto it = e.begin(); it != e.end(); ++it)
    if (!known.count(it.key())) fail(where + "." + it.key(), ": unknown key (known: layer, op, vector, scale, samples, positions)");
  Intervention iv;
  if (!e.contains("layer")) fail(where, ": missing \"layer\"");
  iv.layer = parse_layer(e["layer"], b, where + ".layer");

  if (!e.contains("op") || !e["op"].is_string()) fail(where + ".op", " must be one of \"add\", \"replace\", \"zero\", \"scale\"");
  const std::string op = e["op"];
  if (op == "add") iv.op = Intervention::Op::add;
  else if (op == "replace") iv.op = Intervention::Op::replace;
  else if (op == "zero") iv.op = Intervention::Op::zero;
  else if (op == "scale") iv.op = Intervention::Op::scale;
  else fail(where + ".op", " \"" + op + "\" is not one of add, replace, zero, scale");

  const bool needs_vector = iv.op == Intervention::Op::add || iv.op == Intervention::Op::replace;
  if (needs_vector != e.contains("vector"))
    fail(where + ".vector", needs_vector ? ": missing; \"" + op + "\" needs a vector" : ": \"" + op + "\" takes no vector");
  if (needs_vector) {
    const auto& v = e["vector"];
    if (v.is_array()) {
      iv.vector = inline_vector(v, b.dim, where + ".vector");
    } else if (v.is_object()) {
      if (!loader) fail(where + ".vector", " must be inline (a list of " + std::to_string(b.dim) + " numbers)");
      if (!v.contains("file") || !v["file"].is_string()) fail(where + ".vector.file", " must be a path string");
      for (auto it = v.begin(); it != v.end(); ++it)
        if (it.key() != "file" && it.key() != "tensor") fail(where + ".vector." + it.key(), ": unknown key (known: file, tensor)");
      if (v.contains("tensor") && !v["tensor"].is_string()) fail(where + ".vector.tensor", " must be a string");
      std::filesystem::path file = v["file"].get<std::string>();
      if (file.is_relative()) file = base_dir / file;
      try {
        iv.vector = loader(file, v.value("tensor", std::string()));
      } catch (const std::exception& ex) {
        fail(where + ".vector", ": " + std::string(ex.what()));
      }
      if (static_cast<int64_t>(iv.vector.size()) != b.dim)
        fail(where + ".vector", ": " + file.string() + " gives " + std::to_string(iv.vector.size()) + " values; the model's dim is " +
                                    std::to_string(b.dim));
    } else {
      fail(where + ".vector", " must be {\"file\", \"tensor\"} or a list of " + std::to_string(b.dim) + " numbers");
    }
  }

  if (e.contains("scale")) {
    if (!e["scale"].is_number() || !std::isfinite(e["scale"].get<double>())) fail(where + ".scale", " must be a finite number");
    if (!needs_vector && iv.op != Intervention::Op::scale) fail(where + ".scale", ": \"" + op + "\" takes no scale");
    iv.scale = static_cast<float>(e["scale"].get<double>());
  } else if (iv.op == Intervention::Op::scale) {
    fail(where + ".scale", ": missing; \"scale\" needs the factor");
  }

  if (e.contains("samples")) {
    const auto& s = e["samples"];
    if (s.is_string() && s.get<std::string>() == "all") {
    } else if (s.is_array()) {
      iv.samples = parse_index_list(s, where + ".samples", b.n_samples, std::to_string(b.n_samples) + " samples");
    } else {
      fail(where + ".samples", " must be \"all\" or a list of sample indices");
    }
  }
  if (e.contains("positions")) {
    const auto& p = e["positions"];
    const std::string text = p.is_string() ? p.get<std::string>() : "";
    if (text == "all") iv.positions.kind = PositionSelector::Kind::all;
    else if (text == "prompt") iv.positions.kind = PositionSelector::Kind::prompt;
    else if (text == "generated") iv.positions.kind = PositionSelector::Kind::generated;
    else if (p.is_array()) {
      iv.positions.kind = PositionSelector::Kind::list;
      iv.positions.list = parse_index_list(p, where + ".positions", -1, "");
    } else {
      fail(where + ".positions", " must be \"all\", \"prompt\", \"generated\" or a list of positions");
    }
  }
  return iv;
}

}  // namespace

std::string layer_label(int64_t layer) { return layer == kEmbedLayer ? "embed" : "layer" + std::to_string(layer); }
nlohmann::json layer_json(int64_t layer) { return layer == kEmbedLayer ? nlohmann::json("embed") : nlohmann::json(layer); }

bool CaptureSpec::wants(int64_t layer) const { return std::binary_search(layers.begin(), layers.end(), layer); }

CaptureSpec parse_capture_spec(const std::string& text, const std::string& positions, int64_t n_layers) {
  CaptureSpec spec;
  if (positions == "last")
    spec.last_only = true;
  else if (positions != "all")
    throw InterpretabilityError("--capture-positions \"" + positions + "\" is not one of all, last");
  std::set<int64_t> layers;
  auto check = [&](int64_t l, const std::string& item) {
    if (l >= n_layers)
      throw InterpretabilityError("--capture: layer " + std::to_string(l) + " (in \"" + item + "\") is outside 0.." +
                                  std::to_string(n_layers - 1) + " (the model has " + std::to_string(n_layers) + " layers)");
    return l;
  };
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item = trim(item);
    if (item == "all") {
      layers.insert(kEmbedLayer);
      for (int64_t l = 0; l < n_layers; ++l) layers.insert(l);
    } else if (item == "embed") {
      layers.insert(kEmbedLayer);
    } else if (auto dash = item.find('-'); dash != std::string::npos) {
      const int64_t a = check(parse_int(trim(item.substr(0, dash)), "--capture"), item);
      const int64_t b = check(parse_int(trim(item.substr(dash + 1)), "--capture"), item);
      if (a > b) throw InterpretabilityError("--capture: range \"" + item + "\" runs backwards");
      for (int64_t l = a; l <= b; ++l) layers.insert(l);
    } else {
      layers.insert(check(parse_int(item, "--capture"), item));
    }
  }
  if (layers.empty()) throw InterpretabilityError("--capture \"" + text + "\" names no layer (e.g. all, embed,0,3-4)");
  spec.layers.assign(layers.begin(), layers.end());
  return spec;
}

bool PositionSelector::selects(int64_t pos, int64_t prompt_len) const {
  switch (kind) {
    case Kind::all: return true;
    case Kind::prompt: return pos < prompt_len;
    case Kind::generated: return pos >= prompt_len;
    case Kind::list: return std::binary_search(list.begin(), list.end(), pos);
  }
  return false;
}

bool Intervention::applies_to(uint32_t sample) const {
  return !samples || std::binary_search(samples->begin(), samples->end(), static_cast<int64_t>(sample));
}

const char* op_name(Intervention::Op op) {
  switch (op) {
    case Intervention::Op::add: return "add";
    case Intervention::Op::replace: return "replace";
    case Intervention::Op::zero: return "zero";
    case Intervention::Op::scale: return "scale";
  }
  return "?";
}

std::vector<Intervention> parse_interventions(const nlohmann::json& j, const ModelBounds& bounds, const std::string& where,
                                              const VectorLoader& loader, const std::filesystem::path& base_dir) {
  const nlohmann::json* list = &j;
  std::string path = where;
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "interventions") fail(where + "." + it.key(), ": unknown key (expected {\"interventions\": [...]})");
    if (!j.contains("interventions")) fail(where, ": missing \"interventions\"");
    list = &j["interventions"];
    path += ".interventions";
  }
  if (!list->is_array()) fail(path, " must be a list of interventions");
  std::vector<Intervention> out;
  for (size_t i = 0; i < list->size(); ++i)
    out.push_back(parse_entry((*list)[i], bounds, path + "[" + std::to_string(i) + "]", loader, base_dir));
  return out;
}

std::vector<Intervention> load_interventions_file(const std::filesystem::path& path, const ModelBounds& bounds, const VectorLoader& loader) {
  std::ifstream in(path);
  if (!in) throw InterpretabilityError("--interventions " + path.string() + ": cannot open");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw InterpretabilityError("--interventions " + path.string() + ": malformed JSON: " + e.what());
  }
  return parse_interventions(j, bounds, path.filename().string(), loader, path.parent_path());
}

nlohmann::json interventions_json(const std::vector<Intervention>& interventions) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& iv : interventions) {
    nlohmann::json e = {{"layer", layer_json(iv.layer)}, {"op", op_name(iv.op)}};
    if (!iv.vector.empty()) e["vector"] = iv.vector;
    if (iv.op != Intervention::Op::zero && iv.op != Intervention::Op::replace) e["scale"] = iv.scale;
    e["samples"] = iv.samples ? nlohmann::json(*iv.samples) : nlohmann::json("all");
    switch (iv.positions.kind) {
      case PositionSelector::Kind::all: e["positions"] = "all"; break;
      case PositionSelector::Kind::prompt: e["positions"] = "prompt"; break;
      case PositionSelector::Kind::generated: e["positions"] = "generated"; break;
      case PositionSelector::Kind::list: e["positions"] = iv.positions.list; break;
    }
    out.push_back(std::move(e));
  }
  return out;
}

int64_t InterpretabilityPlan::prompt_length(uint32_t sample) const {
  return sample < prompt_lengths.size() ? prompt_lengths[sample] : 0;
}

InterpretabilityPlan InterpretabilityPlan::for_layers(int64_t begin, int64_t end) const {
  InterpretabilityPlan part;
  part.capture.last_only = capture.last_only;
  for (int64_t l : capture.layers)
    if (l >= begin && l < end) part.capture.layers.push_back(l);
  for (const auto& iv : interventions)
    if (iv.layer >= begin && iv.layer < end) part.interventions.push_back(iv);
  if (!part.empty()) part.prompt_lengths = prompt_lengths;
  return part;
}

nlohmann::json InterpretabilityPlan::to_json() const {
  nlohmann::json layers = nlohmann::json::array();
  for (int64_t l : capture.layers) layers.push_back(layer_json(l));
  return {{"capture", {{"layers", layers}, {"positions", capture.positions_name()}}},
          {"interventions", interventions_json(interventions)},
          {"prompt_lengths", prompt_lengths}};
}

InterpretabilityPlan InterpretabilityPlan::from_json(const nlohmann::json& j, ModelBounds bounds, const std::string& where) {
  if (!j.is_object()) fail(where, " must be an object {\"capture\", \"interventions\", \"prompt_lengths\"}");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key() != "capture" && it.key() != "interventions" && it.key() != "prompt_lengths")
      fail(where + "." + it.key(), ": unknown key (known: capture, interventions, prompt_lengths)");
  InterpretabilityPlan plan;
  if (j.contains("prompt_lengths")) {
    const auto& p = j["prompt_lengths"];
    if (!p.is_array()) fail(where + ".prompt_lengths", " must be a list of integers");
    for (size_t i = 0; i < p.size(); ++i) {
      if (!p[i].is_number_integer() || p[i].get<int64_t>() < 1)
        fail(where + ".prompt_lengths[" + std::to_string(i) + "]", " must be a positive integer, got " + json_excerpt(p[i]));
      plan.prompt_lengths.push_back(p[i].get<int64_t>());
    }
    bounds.n_samples = static_cast<int64_t>(plan.prompt_lengths.size());
  }
  if (j.contains("capture")) {
    const auto& c = j["capture"];
    const std::string cw = where + ".capture";
    if (!c.is_object()) fail(cw, " must be an object {\"layers\", \"positions\"}");
    for (auto it = c.begin(); it != c.end(); ++it)
      if (it.key() != "layers" && it.key() != "positions") fail(cw + "." + it.key(), ": unknown key (known: layers, positions)");
    std::string positions = "all";
    if (c.contains("positions")) positions = c["positions"].is_string() ? c["positions"].get<std::string>() : "";
    if (positions == "last")
      plan.capture.last_only = true;
    else if (positions != "all")
      fail(cw + ".positions", " must be \"all\" or \"last\"");
    if (c.contains("layers")) {
      const auto& layers = c["layers"];
      if (!layers.is_array()) fail(cw + ".layers", " must be a list of layers (\"embed\" or numbers)");
      std::set<int64_t> unique;
      for (size_t i = 0; i < layers.size(); ++i) unique.insert(parse_layer(layers[i], bounds, cw + ".layers[" + std::to_string(i) + "]"));
      plan.capture.layers.assign(unique.begin(), unique.end());
    }
  }
  if (j.contains("interventions")) plan.interventions = parse_interventions(j["interventions"], bounds, where + ".interventions");
  return plan;
}

}  // namespace mdi
