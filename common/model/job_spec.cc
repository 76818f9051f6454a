#include "common/model/job_spec.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/model_spec.h"
#include "common/model/parallel_layout.h"

namespace lmps {
namespace {

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    errors_.push_back(
        absl::StrCat("line ", line + 1, " column ", column + 1, ": ", message));
  }
  void AddWarning(int, int, const std::string&) override {}
  std::string Joined() const { return absl::StrJoin(errors_, "; "); }

 private:
  std::vector<std::string> errors_;
};

template <typename T>
void Default(T value, T* field) {
  if (*field == T{}) *field = value;
}

}  // namespace

// Idempotent: "disabled" is written as a negative value (weight_decay,
// momentum, grad_clip), which stays as it is, so a spec can be defaulted by
// the launcher and again by the scheduler with the same result.
void ApplyJobSpecDefaults(JobSpec* s) {
  if (s->name().empty()) s->set_name("lmps");
  ModelConfig* m = s->mutable_model();
  if (m->n_layer() == 0) m->set_n_layer(4);
  if (m->n_head() == 0) m->set_n_head(4);
  if (m->n_embd() == 0) m->set_n_embd(128);
  if (m->block_size() == 0) m->set_block_size(64);
  if (m->vocab_size() == 0) m->set_vocab_size(256);

  OptimizerConfig* o = s->mutable_optimizer();
  if (o->type() == OPTIMIZER_UNSPECIFIED) o->set_type(ADAMW);
  if (o->lr() == 0) o->set_lr(1e-3f);
  if (o->min_lr() == 0) o->set_min_lr(o->lr() / 10);
  if (o->beta1() == 0) o->set_beta1(0.9f);
  if (o->beta2() == 0) o->set_beta2(0.95f);
  if (o->eps() == 0) o->set_eps(1e-8f);
  if (o->weight_decay() == 0) o->set_weight_decay(0.1f);
  if (o->momentum() == 0 && o->type() == SGD) o->set_momentum(0.9f);
  if (o->grad_clip() == 0) o->set_grad_clip(1.0f);

  DataConfig* d = s->mutable_data();
  if (d->format() == DATA_FORMAT_UNSPECIFIED) d->set_format(BYTE_TEXT);
  if (d->path().empty() && d->format() == BYTE_TEXT) {
    d->set_path(kDefaultDataPath);
  }
  if (d->val_fraction() == 0) d->set_val_fraction(0.1f);

  TrainConfig* t = s->mutable_train();
  if (t->steps() == 0) t->set_steps(200);
  if (t->batch_size() == 0) t->set_batch_size(16);
  if (t->micro_batches() == 0) t->set_micro_batches(1);
  if (t->seed() == 0) t->set_seed(1337);
  if (t->eval_interval() == 0) t->set_eval_interval(50);
  if (t->eval_batches() == 0) t->set_eval_batches(4);
  if (t->checkpoint_interval() == 0) t->set_checkpoint_interval(50);
  if (t->mode() == CONSISTENCY_UNSPECIFIED) t->set_mode(SYNC);
  if (t->sample_tokens() == 0) t->set_sample_tokens(200);
  if (t->peer_timeout_ms() == 0) t->set_peer_timeout_ms(60000);

  LayoutConfig* l = s->mutable_layout();
  if (l->dp() == 0) l->set_dp(1);
  if (l->pp() == 0) l->set_pp(1);
  if (l->tp() == 0) l->set_tp(1);
  if (l->schedule() == PIPELINE_SCHEDULE_UNSPECIFIED) {
    l->set_schedule(ONE_F_ONE_B);
  }
  if (l->num_shards() == 0) l->set_num_shards(1);

  if (s->max_chunk_bytes() == 0) s->set_max_chunk_bytes(4 << 20);
  if (s->max_message_bytes() == 0) s->set_max_message_bytes(4 << 20);
  if (s->streams_per_shard() == 0) s->set_streams_per_shard(1);
  if (s->max_push_stream_bytes() == 0) {
    s->set_max_push_stream_bytes(
        std::max<int64_t>(8 << 20, s->max_message_bytes()));
  }
}

absl::Status ValidateJobSpec(const JobSpec& s) {
  if (absl::Status st = ValidateModelConfig(s.model()); !st.ok()) return st;
  const OptimizerConfig& o = s.optimizer();
  // NaN passes every `x < a || x >= b` test: refuse non-finite values first.
  for (const auto& [name, value] : {std::pair<const char*, float>{"lr", o.lr()},
                                    {"min_lr", o.min_lr()},
                                    {"beta1", o.beta1()},
                                    {"beta2", o.beta2()},
                                    {"eps", o.eps()},
                                    {"weight_decay", o.weight_decay()},
                                    {"momentum", o.momentum()},
                                    {"grad_clip", o.grad_clip()}}) {
    if (!std::isfinite(value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "optimizer.", name, " must be a finite number, got ", value));
    }
  }
  if (!std::isfinite(s.data().val_fraction())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.val_fraction must be a finite number, got ",
        s.data().val_fraction()));
  }
  if (IsTokenData(s.data())) {
    if (s.data().train_shards().empty() || s.data().val_shards().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "data: format ", DataFormat_Name(s.data().format()),
          " needs train_shards and val_shards"));
    }
    if (s.model().vocab_size() > 65536) {
      return absl::InvalidArgumentError(absl::StrCat(
          "data: token shards hold uint16 tokens, so model.vocab_size must "
          "be at most 65536 (got ", s.model().vocab_size(), ")"));
    }
  } else if (s.data().format() != BYTE_TEXT) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.format ", s.data().format(),
        " is not BYTE_TEXT, TOKEN_SHARDS or RAW_TOKENS"));
  }
  if (!(o.lr() > 0) || !std::isfinite(o.lr()) || o.min_lr() < 0 ||
      o.min_lr() > o.lr()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "optimizer: need 0 < lr and 0 <= min_lr <= lr (got lr=", o.lr(),
        " min_lr=", o.min_lr(), ")"));
  }
  if (o.beta1() < 0 || o.beta1() >= 1 || o.beta2() < 0 || o.beta2() >= 1) {
    return absl::InvalidArgumentError(
        "optimizer: beta1 and beta2 must be in [0, 1)");
  }
  if (o.warmup_steps() < 0 || o.momentum() >= 1) {
    return absl::InvalidArgumentError(
        "optimizer: warmup_steps must be >= 0 and momentum < 1");
  }
  const TrainConfig& t = s.train();
  const LayoutConfig& l = s.layout();
  if (t.steps() < 0 || t.batch_size() < 0 || t.micro_batches() < 0 ||
      t.stop_after_step() < 0 || t.sample_tokens() < 0) {
    return absl::InvalidArgumentError(
        "train: steps, batch_size, micro_batches, stop_after_step and "
        "sample_tokens must not be negative");
  }
  if (l.dp() < 1 || l.num_shards() < 1 || l.num_shards() > 1024 ||
      l.dp() > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout: dp and num_shards must be in [1, 1024] (got dp=", l.dp(),
        " num_shards=", l.num_shards(), ")"));
  }
  if (absl::StatusOr<ParallelLayout> layout =
          ParallelLayout::Create(s.model(), l);
      !layout.ok()) {
    return layout.status();
  }
  if (l.schedule() != ONE_F_ONE_B && l.schedule() != GPIPE) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout.schedule: unknown value ", static_cast<int>(l.schedule()),
        "; valid: ONE_F_ONE_B, GPIPE"));
  }
  if (l.pp() * l.tp() > 1 && t.mode() == ASYNC) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.mode ASYNC is not supported with pp=", l.pp(), " tp=", l.tp(),
        "; valid with pipeline or tensor parallelism: SYNC, "
        "BOUNDED_STALENESS"));
  }
  if (t.dp_aggregation() != PARAMETER_SERVER &&
      t.dp_aggregation() != RING_ALLREDUCE) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.dp_aggregation: unknown value ",
        static_cast<int>(t.dp_aggregation()),
        "; valid: PARAMETER_SERVER, RING_ALLREDUCE"));
  }
  if (t.dp_aggregation() == RING_ALLREDUCE) {
    if (t.mode() == ASYNC || t.mode() == BOUNDED_STALENESS) {
      return absl::InvalidArgumentError(absl::StrCat(
          "train.dp_aggregation RING_ALLREDUCE needs train.mode SYNC, got ",
          ConsistencyMode_Name(t.mode()),
          ": the ring all-reduce is a barrier of every replica each step"));
    }
    if (l.pp() * l.tp() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "train.dp_aggregation RING_ALLREDUCE is not supported with pp=",
          l.pp(), " tp=", l.tp(), " yet (pp = tp = 1 only)"));
    }
    if (t.has_compression() && t.compression().kind() != 0) {
      return absl::InvalidArgumentError(
          "train.dp_aggregation RING_ALLREDUCE does not compress: "
          "train.compression must be unset (it compresses pushes to the "
          "shards)");
    }
    if (t.pull_dtype() == BF16) {
      return absl::InvalidArgumentError(
          "train.dp_aggregation RING_ALLREDUCE needs fp32 pulls: "
          "train.pull_dtype BF16 would start the replicas from rounded "
          "parameters while the shards keep the fp32 master; unset it or set "
          "F32");
    }
  }
  if (t.workers_per_host() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.workers_per_host must be >= 0, got ", t.workers_per_host()));
  }
  if (t.workers_per_host() > 1) {
    const std::string what =
        absl::StrCat("train.workers_per_host ", t.workers_per_host(),
                     " (hierarchical aggregation)");
    if (l.dp() % t.workers_per_host() != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " must divide layout.dp ", l.dp(),
                       ": every host holds the same number of replicas"));
    }
    if (t.mode() == ASYNC || t.mode() == BOUNDED_STALENESS) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " needs train.mode SYNC, got ", ConsistencyMode_Name(t.mode()),
          ": a host's workers sum their gradients every step"));
    }
    if (l.pp() * l.tp() > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " is not supported with pp=", l.pp(), " tp=",
                       l.tp(), " yet (pp = tp = 1 only)"));
    }
    if (t.dp_aggregation() == RING_ALLREDUCE) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " groups the pushes to the shards; RING_ALLREDUCE has none "
                "(every replica is in one ring already)"));
    }
  }
  if (t.peer_timeout_ms() < 1 || t.peer_timeout_ms() > 3600000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.peer_timeout_ms must be in [1, 3600000], got ",
        t.peer_timeout_ms()));
  }
  const int per_step = l.dp() * t.micro_batches();
  if (t.batch_size() % per_step != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.batch_size (", t.batch_size(),
        ") must be divisible by layout.dp * train.micro_batches (", per_step,
        "); valid batch sizes are multiples of ", per_step));
  }
  if (s.max_chunk_bytes() < 4 || s.max_message_bytes() < 1024) {
    return absl::InvalidArgumentError(
        "max_chunk_bytes must be >= 4 and max_message_bytes >= 1024");
  }
  if (s.max_message_bytes() > (64 << 20)) {
    return absl::InvalidArgumentError(
        "max_message_bytes must be at most 64 MiB");
  }
  if (s.streams_per_shard() < 1 || s.streams_per_shard() > 16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "streams_per_shard must be in [1, 16], got ", s.streams_per_shard()));
  }
  if (!SharedMemory_IsValid(s.shared_memory())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shared_memory ", static_cast<int>(s.shared_memory()),
        " is not valid; valid: SHARED_MEMORY_AUTO, SHARED_MEMORY_OFF"));
  }
  if (s.max_push_stream_bytes() < s.max_message_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_push_stream_bytes (", s.max_push_stream_bytes(),
        ") must be at least max_message_bytes (", s.max_message_bytes(),
        "): a push stream holds at least one message"));
  }
  if (absl::Status st = ValidateCompression(s.train().compression());
      !st.ok()) {
    return st;
  }
  const DType pull = s.train().pull_dtype();
  if (pull != DTYPE_UNSPECIFIED && pull != F32 && pull != BF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.pull_dtype ",
        DType_IsValid(pull) ? DType_Name(pull)
                            : std::to_string(static_cast<int>(pull)),
        " is not valid; valid: F32, BF16 (unset: BF16 on CUDA workers, F32 on "
        "CPU workers)"));
  }
  if (!LayerwisePullMode_IsValid(s.train().layerwise_pull())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.layerwise_pull ", static_cast<int>(s.train().layerwise_pull()),
        " is not valid; valid: LAYERWISE_PULL_ON, LAYERWISE_PULL_OFF"));
  }
  return ValidateConsistency(s);
}

absl::Status ValidateCompression(const CompressionConfig& c) {
  const float ratio = c.ratio();
  switch (c.kind()) {
    case COMPRESSION_NONE:
    case QUANT_INT8:
      if (ratio != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "train.compression.ratio (", ratio, ") is for TOPK and RANDOMK "
            "only; train.compression.kind is ",
            CompressionKind_Name(c.kind())));
      }
      return absl::OkStatus();
    case TOPK:
    case RANDOMK:
      // NaN fails every comparison: test for the valid range.
      if (!(ratio > 0 && ratio <= kMaxCompressionRatio)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "train.compression.ratio must be in (0, ", kMaxCompressionRatio,
            "] for ", CompressionKind_Name(c.kind()), ", got ", ratio,
            ratio == 0 ? " (unset)" : "",
            ratio > kMaxCompressionRatio
                ? " (above 0.5 a sparse slice's indices make it larger than "
                  "the dense one)"
                : ""));
      }
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "train.compression.kind ", static_cast<int>(c.kind()),
          " is not valid; valid: COMPRESSION_NONE, TOPK, RANDOMK, QUANT_INT8"));
  }
}

absl::Status ValidateConsistency(const JobSpec& s) {
  const TrainConfig& t = s.train();
  const ConsistencyMode mode = t.mode();
  if (mode != SYNC && mode != ASYNC && mode != BOUNDED_STALENESS) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.mode: unknown value ", static_cast<int>(mode),
        "; valid: SYNC, ASYNC, BOUNDED_STALENESS"));
  }
  if (t.staleness() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.staleness must be >= 0 (steps a replica may run ahead of the "
        "slowest), got ",
        t.staleness()));
  }
  if (t.staleness() > kMaxStaleness) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.staleness must be at most ", kMaxStaleness, ", got ",
        t.staleness(), " (each shard keeps staleness + 1 gradient buffers "
        "per replica)"));
  }
  if (t.staleness() > 0 && mode != BOUNDED_STALENESS) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.staleness (", t.staleness(),
        ") only applies to mode BOUNDED_STALENESS, but train.mode is ",
        ConsistencyMode_Name(mode)));
  }
  const int backups = s.layout().shard_backups();
  if (backups < 0 || backups > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout.shard_backups must be 0 or 1 (backups per shard), got ",
        backups));
  }
  if (backups > 0 && t.staleness() > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout.shard_backups needs train.mode SYNC (or BOUNDED_STALENESS "
        "with staleness 0); train.mode is ",
        ConsistencyMode_Name(mode), " with staleness ", t.staleness(),
        " (a backup copies the shard at step boundaries, where SYNC has no "
        "pending gradients)"));
  }
  if (backups > 0 && mode == ASYNC) {
    return absl::InvalidArgumentError(
        "layout.shard_backups needs train.mode SYNC (or BOUNDED_STALENESS "
        "with staleness 0); ASYNC applies pushes in arrival order, which a "
        "backup cannot reproduce");
  }
  if (t.debug_slow_worker_delay_ms() < 0 ||
      t.debug_slow_worker_delay_ms() > 60000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.debug_slow_worker_delay_ms must be in [0, 60000], got ",
        t.debug_slow_worker_delay_ms()));
  }
  if (t.debug_slow_worker_delay_ms() > 0 &&
      (t.debug_slow_worker_rank() < 0 ||
       t.debug_slow_worker_rank() >= s.layout().dp())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.debug_slow_worker_rank ", t.debug_slow_worker_rank(),
        " is not a data-parallel rank; valid: [0, ", s.layout().dp(), ")"));
  }
  return absl::OkStatus();
}

int EffectiveStaleness(const JobSpec& spec) {
  return spec.train().mode() == BOUNDED_STALENESS ? spec.train().staleness()
                                                  : 0;
}

bool WorkersNeedPeers(const JobSpec& spec) {
  const LayoutConfig& l = spec.layout();
  return l.pp() * l.tp() > 1 ||
         (spec.train().dp_aggregation() == RING_ALLREDUCE && l.dp() > 1) ||
         WorkersPerHost(spec) > 1;
}

int WorkersPerHost(const JobSpec& spec) {
  return std::max(1, spec.train().workers_per_host());
}

int PushingReplicas(const JobSpec& spec) {
  if (spec.train().dp_aggregation() == RING_ALLREDUCE) return 1;
  return spec.layout().dp() / WorkersPerHost(spec);
}

absl::StatusOr<JobSpec> ParseJobSpec(const std::string& text,
                                     JobSpecCheck check) {
  JobSpec spec;
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &spec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed job spec: ", errors.Joined()));
  }
  ApplyJobSpecDefaults(&spec);
  if (check == JobSpecCheck::kParseOnly) return spec;
  if (absl::Status s = ValidateJobSpec(spec); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid job spec: ", s.message()));
  }
  return spec;
}

absl::StatusOr<JobSpec> LoadJobSpecFile(const std::string& path,
                                        JobSpecCheck check) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot read job spec file '", path, "'"));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  absl::StatusOr<JobSpec> spec = ParseJobSpec(buf.str(), check);
  if (!spec.ok()) {
    return absl::Status(spec.status().code(),
                        absl::StrCat(path, ": ", spec.status().message()));
  }
  return spec;
}

int LocalBatch(const JobSpec& spec) {
  return spec.train().batch_size() / spec.layout().dp();
}

}  // namespace lmps
