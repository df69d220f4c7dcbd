#include "common/train/plan.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "common/wire/json_excerpt.hpp"

namespace mdi {

PipelineSchedule parse_schedule(const std::string& name) {
  if (name == "gpipe") return PipelineSchedule::gpipe;
  if (name == "1f1b") return PipelineSchedule::one_f_one_b;
  throw TrainingPlanError("schedule \"" + name + "\" is not one of gpipe, 1f1b");
}

const char* schedule_name(PipelineSchedule schedule) { return schedule == PipelineSchedule::gpipe ? "gpipe" : "1f1b"; }

std::vector<StageOp> secondary_schedule(PipelineSchedule schedule, int64_t n_stages, int64_t stage, int64_t micro_batches) {
  if (stage < 1 || stage >= n_stages) throw std::invalid_argument("stage " + std::to_string(stage) + " is no secondary of " + std::to_string(n_stages));
  std::vector<StageOp> ops;
  const int64_t warmup = schedule == PipelineSchedule::gpipe ? micro_batches : std::min(micro_batches, n_stages - stage);
  int64_t next_forward = 0, next_backward = 0;
  while (next_forward < warmup) ops.push_back({StageOp::forward, next_forward++});
  while (next_forward < micro_batches) {
    ops.push_back({StageOp::backward, next_backward++});
    ops.push_back({StageOp::forward, next_forward++});
  }
  while (next_backward < micro_batches) ops.push_back({StageOp::backward, next_backward++});
  return ops;
}

int64_t starter_in_flight_limit(PipelineSchedule schedule, int64_t n_stages, int64_t micro_batches) {
  return schedule == PipelineSchedule::gpipe ? micro_batches : std::min(micro_batches, n_stages);
}

double theoretical_bubble(int64_t n_stages, int64_t micro_batches) {
  return static_cast<double>(n_stages - 1) / static_cast<double>(micro_batches + n_stages - 1);
}

std::string TrainableSet::to_string() const {
  std::vector<std::string> items;
  if (embedding) items.push_back("embed");
  for (auto it = layers.begin(); it != layers.end();) {
    const int64_t first = *it;
    int64_t last = first;
    while (++it != layers.end() && *it == last + 1) ++last;
    items.push_back(first == last ? std::to_string(first) : std::to_string(first) + "-" + std::to_string(last));
  }
  if (head) items.push_back("head");
  std::string out;
  for (auto& item : items) out += (out.empty() ? "" : ",") + item;
  return out;
}

TrainableSet parse_trainable_set(const std::string& spec, int64_t n_layers) {
  TrainableSet set;
  if (spec == "all") {
    for (int64_t l = 0; l < n_layers; ++l) set.layers.insert(l);
    set.embedding = set.head = true;
    return set;
  }
  auto number = [&](const std::string& text, const std::string& item) {
    if (text.empty() || text.size() > 9 || text.find_first_not_of("0123456789") != std::string::npos)
      throw TrainingPlanError("--train-layers: \"" + item + "\" is not a layer number, range A-B, embed, head or all");
    const int64_t layer = std::stoll(text);
    if (layer >= n_layers)
      throw TrainingPlanError("--train-layers: layer " + text + " does not exist; the model has layers 0-" + std::to_string(n_layers - 1));
    return layer;
  };
  std::stringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (item == "embed") {
      set.embedding = true;
    } else if (item == "head") {
      set.head = true;
    } else if (auto dash = item.find('-'); dash != std::string::npos) {
      const int64_t first = number(item.substr(0, dash), item), last = number(item.substr(dash + 1), item);
      if (first > last) throw TrainingPlanError("--train-layers: range \"" + item + "\" is empty");
      for (int64_t l = first; l <= last; ++l) set.layers.insert(l);
    } else {
      set.layers.insert(number(item, item));
    }
  }
  if (set.layers.empty() && !set.embedding && !set.head)
    throw TrainingPlanError("--train-layers \"" + spec + "\" selects nothing to train");
  return set;
}

nlohmann::json OptimizerSettings::to_json() const {
  return {{"lr", lr}, {"warmup", warmup}, {"beta1", beta1}, {"beta2", beta2}, {"eps", eps}, {"weight_decay", weight_decay}, {"clip", clip}};
}

namespace {
const nlohmann::json& field(const nlohmann::json& j, const char* name, const std::string& where) {
  if (!j.is_object() || !j.contains(name)) throw TrainingPlanError(where + ": missing field \"" + name + "\"");
  return j[name];
}

double number_field(const nlohmann::json& j, const char* name, const std::string& where, double min, double max) {
  const auto& v = field(j, name, where);
  if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < min || v.get<double>() > max)
    throw TrainingPlanError(where + ": \"" + name + "\" must be a number in [" + std::to_string(min) + ", " + std::to_string(max) +
                            "], got " + json_excerpt(v));
  return v.get<double>();
}

int64_t integer_field(const nlohmann::json& j, const char* name, const std::string& where, int64_t min, int64_t max) {
  const auto& v = field(j, name, where);
  if (!v.is_number_integer() || v.get<int64_t>() < min || v.get<int64_t>() > max)
    throw TrainingPlanError(where + ": \"" + name + "\" must be an integer in " + std::to_string(min) + ".." + std::to_string(max) +
                            ", got " + json_excerpt(v));
  return v.get<int64_t>();
}

std::string string_field(const nlohmann::json& j, const char* name, const std::string& where) {
  const auto& v = field(j, name, where);
  if (!v.is_string()) throw TrainingPlanError(where + ": \"" + name + "\" must be a string, got " + json_excerpt(v));
  return v.get<std::string>();
}
}  // namespace

OptimizerSettings OptimizerSettings::from_json(const nlohmann::json& j, const std::string& where) {
  OptimizerSettings s;
  s.lr = number_field(j, "lr", where, 0, 10);
  s.warmup = integer_field(j, "warmup", where, 0, 1 << 30);
  s.beta1 = number_field(j, "beta1", where, 0, 0.999999);
  s.beta2 = number_field(j, "beta2", where, 0, 0.999999);
  s.eps = number_field(j, "eps", where, 1e-30, 1);
  s.weight_decay = number_field(j, "weight_decay", where, 0, 1);
  s.clip = number_field(j, "clip", where, 0, 1e12);
  return s;
}

double learning_rate(const OptimizerSettings& s, int64_t step) {
  if (s.warmup > 0 && step <= s.warmup) return s.lr * static_cast<double>(step) / static_cast<double>(s.warmup);
  return s.lr;
}

double clip_factor(double global_norm_sq, double clip) {
  const double norm = std::sqrt(global_norm_sq);
  return clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0;
}

bool TrainingPlan::saves_after(int64_t step) const {
  if (checkpoint_dir.empty()) return false;
  return step == steps || (save_every > 0 && step % save_every == 0);
}

nlohmann::json TrainingPlan::to_json() const {
  return {{"schedule", schedule_name(schedule)}, {"micro_batches", micro_batches}, {"seq_len", seq_len},
          {"micro_batch_sequences", micro_batch_sequences},
          {"train_layers", trainable.to_string()}, {"optimizer", optimizer.to_json()}, {"first_step", first_step},
          {"steps", steps}, {"save_every", save_every}, {"checkpoint_dir", checkpoint_dir}, {"upload_stages", upload_stages},
          {"resume", {{"file", resume_file}, {"sha256", resume_sha256}}}};
}

TrainingPlan TrainingPlan::from_json(const nlohmann::json& j, int64_t n_layers, int64_t max_seq_len) {
  const std::string where = "/init: training";
  if (!j.is_object()) throw TrainingPlanError(where + " must be an object");
  TrainingPlan p;
  p.schedule = parse_schedule(string_field(j, "schedule", where));
  p.micro_batches = integer_field(j, "micro_batches", where, 1, 4096);
  p.seq_len = integer_field(j, "seq_len", where, 1, max_seq_len);
  p.micro_batch_sequences = integer_field(j, "micro_batch_sequences", where, 1, 65536);
  p.trainable = parse_trainable_set(string_field(j, "train_layers", where), n_layers);
  p.optimizer = OptimizerSettings::from_json(field(j, "optimizer", where), where + ".optimizer");
  p.steps = integer_field(j, "steps", where, 1, 1ll << 40);
  p.first_step = integer_field(j, "first_step", where, 1, p.steps);
  p.save_every = integer_field(j, "save_every", where, 0, 1ll << 40);
  p.checkpoint_dir = string_field(j, "checkpoint_dir", where);
  const auto& upload = field(j, "upload_stages", where);
  if (!upload.is_boolean()) throw TrainingPlanError(where + ": \"upload_stages\" must be true or false, got " + json_excerpt(upload));
  p.upload_stages = upload.get<bool>();
  const auto& resume = field(j, "resume", where);
  p.resume_file = string_field(resume, "file", where + ".resume");
  p.resume_sha256 = string_field(resume, "sha256", where + ".resume");
  if (p.resume_file.empty() != p.resume_sha256.empty())
    throw TrainingPlanError(where + ".resume: \"file\" and \"sha256\" come together");
  if (!p.resume_file.empty() && p.first_step == 1) throw TrainingPlanError(where + ": resuming needs first_step > 1");
  return p;
}

}  // namespace mdi
