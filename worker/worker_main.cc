// lmps_worker: a stateless training worker. It registers with the
// scheduler, receives its assignment (ranks, job spec, partition map, shard
// addresses), pulls parameters, computes forward and backward on its
// backend, pushes gradients, and reports progress in its heartbeats. A
// replacement started with the same flags reproduces exactly what it lost.
//
// Transport security (common/security.h): --tls_ca, --tls_cert/--tls_key
// (the client certificate shown to the scheduler and the shards) and
// --auth_token_file secure every channel this worker opens.
//
// Exit status: 0 when the job finished, 1 on an error (printed), 2 on bad
// flags.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/allocator.h"
#include "common/daemon_metrics.h"
#include "common/grpc_server.h"
#include "common/job_spec.h"
#include "common/scheduler_client.h"
#include "common/security.h"
#include "common/security_flags.h"
#include "common/status_util.h"
#include "worker/backend_factory.h"
#include "worker/data/dataset.h"
#include "common/parallel_layout.h"
#include "worker/model/gpt.h"
#include "worker/model/stage_model.h"
#include "worker/peer/mailbox.h"
#include "worker/peer/peer_network.h"
#include "worker/peer/peer_service.h"
#include "worker/peer/ring_allreduce.h"
#include "worker/pipeline/pipeline_trainer.h"
#include "worker/ps_client.h"
#include "worker/trainer.h"

ABSL_FLAG(std::string, scheduler, "", "scheduler address host:port (required)");
ABSL_FLAG(std::string, backend, "cpu", "compute backend: cpu, or cuda[:N]");
ABSL_FLAG(std::string, cuda_backend_lib, "",
          "lmps_worker_cuda: path of liblmps_cuda_backend.so (default: beside "
          "the binary, in its runfiles, then LD_LIBRARY_PATH)");
ABSL_FLAG(std::string, cuda_matmul, "",
          "matrix-product input precision of --backend=cuda: tf32 or bf16 "
          "(bf16 copies of fp32 operands, fp32 accumulation); empty: the "
          "backend's default (bf16)");
ABSL_FLAG(int, rank, -1,
          "worker rank to ask the scheduler for (-1: the next free one)");
ABSL_FLAG(int, threads, 0,
          "compute threads (0: all cores divided by --workers_per_host)");
ABSL_FLAG(int, workers_per_host, 1,
          "workers sharing this machine's cores (for the --threads default)");
ABSL_FLAG(std::string, data, "",
          "data file; overrides the job spec's data.path (same contents "
          "expected on every worker)");
ABSL_FLAG(std::string, sample_out, "",
          "data-parallel rank 0 writes the generated sample here");
ABSL_FLAG(std::string, sample_prompt, "The ", "prompt for the sample");
ABSL_FLAG(double, sample_temperature, 0.8, "sampling temperature (0: greedy)");
ABSL_FLAG(int, sample_top_k, 40, "top-k for sampling (0: all)");
ABSL_FLAG(std::string, push_dtype, "f32", "gradient payload: f32 or bf16");
ABSL_FLAG(std::string, overlap_push, "auto",
          "true: push the gradient while the step's last backward pass runs "
          "(pipeline stages: the schedule's last), each block's part as "
          "soon as it is final (bit-identical results); false: push after "
          "the backward pass; auto: true with a CUDA backend (the host is "
          "idle during backward), false with the CPU backend (its cores are "
          "busy: bench/ps_features.sh measured overlap 7% slower on 2 cores)");
ABSL_FLAG(std::string, metrics_listen, "",
          "serve Prometheus /metrics on this host:port (empty: off)");
ABSL_FLAG(int, rpc_timeout_s, 120,
          "deadline of each parameter-server RPC (pull waits for peers)");
ABSL_FLAG(int, fault_kill_at_step, -1,
          "fault injection for tests: SIGKILL this worker in the middle of "
          "pushing its gradient for this step, right after shard 0 accepted "
          "it (with --overlap_push: its first part) and before the other "
          "shards did; with pp * tp > 1, as the "
          "step's pipeline schedule starts (-1: never)");
ABSL_FLAG(int, assemble_timeout_s, 120,
          "how long to wait for the scheduler and the job to assemble");
ABSL_FLAG(bool, spare, false,
          "a spare worker: wait (up to --spare_wait_s) until a worker of the "
          "running job dies and take over its slot, then train; exit 0 "
          "without training if the job finishes first");
ABSL_FLAG(int, spare_wait_s, 86400, "how long a --spare waits for a slot");
ABSL_FLAG(std::string, peer_listen, "0.0.0.0:0",
          "where the WorkerPeer service (pipeline activations, tensor-parallel "
          "all-reduce) listens; port 0 picks a free port");
ABSL_FLAG(std::string, peer_tls_cert, "",
          "with TLS: the certificate (and --peer_tls_key its key) the "
          "WorkerPeer service presents to other workers, who check it like a "
          "server's; empty: --tls_cert");
ABSL_FLAG(std::string, peer_tls_key, "", "see --peer_tls_cert");
ABSL_FLAG(std::string, advertise_host, "127.0.0.1",
          "host other workers reach this worker's WorkerPeer service at; the "
          "advertised address is advertise_host:<bound port>");

namespace lmps {
namespace {

void Log(const std::string& id, const std::string& msg) {
  std::fprintf(stderr, "[%s] %s\n", id.c_str(), msg.c_str());
  std::fflush(stderr);
}

// Sets *register_again when an elastic scheduler resized the job: the
// caller runs it again (a fresh registration for the resized job).
absl::Status RunWorker(bool* register_again) {
  const std::string scheduler = absl::GetFlag(FLAGS_scheduler);
  if (scheduler.empty()) {
    return absl::InvalidArgumentError("--scheduler=host:port is required");
  }
  PsClientOptions ps_options;
  const std::string push_dtype = absl::GetFlag(FLAGS_push_dtype);
  if (push_dtype == "bf16") {
    ps_options.push_dtype = BF16;
  } else if (push_dtype != "f32") {
    return absl::InvalidArgumentError(
        absl::StrCat("--push_dtype must be f32 or bf16, got '", push_dtype, "'"));
  }
  ps_options.rpc_timeout = absl::Seconds(absl::GetFlag(FLAGS_rpc_timeout_s));
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) {
    threads = std::max<int>(1, std::thread::hardware_concurrency() /
                                   std::max(1, absl::GetFlag(FLAGS_workers_per_host)));
  }
  absl::StatusOr<DaemonMetrics> started =
      StartDaemonMetrics(absl::GetFlag(FLAGS_metrics_listen), "worker");
  LMPS_RETURN_IF_ERROR(started.status());
  DaemonMetrics metrics = std::move(*started);
  Metrics* m = metrics.metrics.get();
  // Fail fast on a backend this machine cannot run, before joining a job.
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                        CreateBackend(absl::GetFlag(FLAGS_backend), threads,
                                      absl::GetFlag(FLAGS_cuda_matmul),
                                      absl::GetFlag(FLAGS_cuda_backend_lib)));
  // Says which backend computes (tests check that --backend=cuda never falls
  // back to the CPU).
  Log("worker", absl::StrCat("backend ", std::string(backend->name()),
                             " (--backend=", absl::GetFlag(FLAGS_backend), ")"));

  LMPS_ASSIGN_OR_RETURN(const Security security,
                        Security::Load(SecurityOptionsFromFlags()));
  const absl::Duration assemble = absl::Seconds(absl::GetFlag(FLAGS_assemble_timeout_s));
  SchedulerClient client(
      Scheduler::NewStub(MakeChannel(scheduler, metrics.rpc.get(), security)),
      scheduler);
  // The WorkerPeer service: peers send activations, their gradients and
  // all-reduce parts here (pipeline and tensor parallel layouts).
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<PeerMailbox> mailbox_owner,
                        PeerMailbox::Create(PeerMailboxOptions()));
  PeerMailbox& mailbox = *mailbox_owner;
  LMPS_ASSIGN_OR_RETURN(
      std::unique_ptr<WorkerPeerService> peer_service,
      WorkerPeerService::Create(&mailbox, WorkerPeerServiceOptions()));
  GrpcServerOptions peer_options;
  peer_options.listen_address = absl::GetFlag(FLAGS_peer_listen);
  peer_options.rpc_metrics = metrics.rpc.get();
  peer_options.security = security;
  if (!absl::GetFlag(FLAGS_peer_tls_cert).empty() ||
      !absl::GetFlag(FLAGS_peer_tls_key).empty()) {
    SecurityOptions peer_security = SecurityOptionsFromFlags();
    peer_security.cert = absl::GetFlag(FLAGS_peer_tls_cert);
    peer_security.key = absl::GetFlag(FLAGS_peer_tls_key);
    LMPS_ASSIGN_OR_RETURN(peer_options.security, Security::Load(peer_security));
  }
  peer_options.metrics = m;
  absl::StatusOr<StartedServer> peer_started =
      StartGrpcServer(peer_options, {peer_service.get()});
  if (!peer_started.ok()) {
    // Data-parallel jobs do not need it; the scheduler refuses a worker
    // without an address in a pipeline or tensor-parallel job.
    Log("worker", absl::StrCat("warning: no WorkerPeer service (pipeline and "
                               "tensor-parallel jobs need it): ",
                               peer_started.status().ToString()));
    peer_started = StartedServer();
  }
  StartedServer peer_server = std::move(*peer_started);
  std::string peer_address;
  if (peer_server.server != nullptr) {
    SetServing(peer_server.server.get(), true);
    peer_address =
        absl::StrCat(absl::GetFlag(FLAGS_advertise_host), ":", peer_server.port);
  }
  struct StopPeerServer {
    PeerMailbox* mailbox;
    grpc::Server* server;
    ~StopPeerServer() {
      mailbox->Shutdown();
      if (server != nullptr) {
        server->Shutdown(std::chrono::system_clock::now() +
                         std::chrono::seconds(2));
      }
    }
  } stop_peer_server{&mailbox, peer_server.server.get()};

  RegisterRequest reg;
  reg.set_role(WORKER);
  reg.set_address(peer_address);
  reg.set_requested_rank(absl::GetFlag(FLAGS_rank));
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  reg.set_hostname(host);
  reg.set_instance_id(absl::StrCat(host, "/", getpid(), "/",
                                   absl::ToUnixNanos(absl::Now())));
  const bool spare = absl::GetFlag(FLAGS_spare);
  if (spare) {
    // Never take a slot meant for a first worker: wait until the job runs.
    auto status_stub =
        Scheduler::NewStub(MakeChannel(scheduler, metrics.rpc.get(), security));
    const absl::Time give_up =
        absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_spare_wait_s));
    JobStatus status;
    while (true) {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
      status.Clear();
      const bool ok = status_stub->GetStatus(&ctx, GetStatusRequest(), &status).ok();
      if (ok && status.state() == RUNNING) break;
      if (ok && status.state() == FINISHED) {
        Log("worker", "spare: the job finished without needing this spare");
        return absl::OkStatus();
      }
      if (ok && status.state() == FAILED) {
        return absl::AbortedError(absl::StrCat("spare: the job FAILED: ", status.message()));
      }
      if (absl::Now() > give_up) {
        return absl::DeadlineExceededError(absl::StrCat(
            "spare: the job at ", scheduler, " did not start running within ",
            absl::GetFlag(FLAGS_spare_wait_s), " s"));
      }
      absl::SleepFor(absl::Milliseconds(100));
    }
    Log("worker", "spare: waiting for a slot of the running job (a worker "
                  "whose lease expired)");
  }
  absl::StatusOr<RegisterResponse> registered = client.Register(
      reg, spare ? absl::Seconds(absl::GetFlag(FLAGS_spare_wait_s)) : assemble);
  // A surplus worker of an elastic job (every slot held, dp at its largest
  // or not enough surplus for a replica yet) stands by and keeps asking:
  // it joins when dp grows or takes a dead worker's slot, and exits 0 when
  // the job finishes without it.
  for (bool said = false;
       ReasonOf(registered.status()) == ELASTIC_SURPLUS;) {
    if (!said) {
      Log("worker", "surplus worker of an elastic job: standing by until dp "
                    "grows or a worker's slot is free");
      said = true;
    }
    registered = client.Register(reg, assemble);
  }
  if (ReasonOf(registered.status()) == JOB_FINISHED) {
    // A spare, a surplus worker of an elastic job, or a replacement that
    // came too late: nothing left to do.
    Log("worker", "the job finished without needing this worker");
    return absl::OkStatus();
  }
  LMPS_RETURN_IF_ERROR(registered.status());
  const std::string id = client.node_id();
  Log(id, absl::StrCat("registered with scheduler ", scheduler, " (",
                       security.Describe(),
                       "); waiting for the job to assemble"));
  LMPS_ASSIGN_OR_RETURN(Assignment assignment, client.WaitForAssignment(assemble));
  JobSpec spec = assignment.spec();
  if (!absl::GetFlag(FLAGS_data).empty()) {
    spec.mutable_data()->set_path(absl::GetFlag(FLAGS_data));
  }
  Log(id, absl::StrCat("assigned dp rank ", assignment.dp_rank(), " of ",
                       spec.layout().dp(), ", ", assignment.shard_addresses_size(),
                       " shards, resume step ", assignment.start_step(),
                       ", backend ", std::string(backend->name()), " with ", threads,
                       " threads"));

  LMPS_ASSIGN_OR_RETURN(
      std::unique_ptr<TextDataset> data,
      TextDataset::Create(spec.data().path(), spec.data().val_fraction(),
                          spec.model().block_size()));
  const int micro = LocalBatch(spec) / spec.train().micro_batches();
  LMPS_ASSIGN_OR_RETURN(const ParallelLayout layout,
                        ParallelLayout::Create(spec.model(), spec.layout()));
  const bool pipeline = layout.pp() * layout.tp() > 1;
  const WorkerCoords coords{assignment.dp_rank(), assignment.pp_rank(),
                            assignment.tp_rank()};
  {
    // If the scheduler restarts, take this rank back from the new one.
    RegisterRequest rejoin = reg;
    rejoin.set_requested_rank(layout.Rank(coords));
    client.EnableRejoin(rejoin);
  }
  std::vector<std::unique_ptr<ParameterServer::StubInterface>> stubs;
  std::vector<std::string> addresses(assignment.shard_addresses().begin(),
                                     assignment.shard_addresses().end());
  for (const std::string& a : addresses) {
    stubs.push_back(
        ParameterServer::NewStub(MakeChannel(a, metrics.rpc.get(), security)));
  }
  ps_options.max_message_bytes = spec.max_message_bytes();
  if (!pipeline && absl::GetFlag(FLAGS_fault_kill_at_step) >= 0) {
    const int64_t kill_step = absl::GetFlag(FLAGS_fault_kill_at_step);
    // Shards other than 0 whose push of kill_step was accepted: the log
    // line says where the kill landed, and tests check it (0: between
    // shard 0's push and the others').
    auto others_accepted = std::make_shared<std::atomic<int>>(0);
    ps_options.on_shard_push = [id, kill_step, others_accepted](
                                   int shard, int64_t step, bool accepted) {
      if (step != kill_step) return;
      if (shard != 0) {
        if (accepted) {
          ++*others_accepted;
        } else {
          // Hold the other shards' pushes so the kill lands mid-push.
          absl::SleepFor(absl::Seconds(5));
        }
        return;
      }
      if (!accepted) return;
      Log(id, absl::StrCat("fault injection: SIGKILL mid-push of step ", step,
                           ": shard 0 accepted its push, ",
                           others_accepted->load(),
                           " other shards had accepted theirs"));
      raise(SIGKILL);
    };
  }
  PsClientView view;
  if (pipeline) {
    view.layout = &layout;
    view.pp_rank = coords.pp;
    view.tp_rank = coords.tp;
  }
  LMPS_ASSIGN_OR_RETURN(
      std::unique_ptr<PsClient> ps,
      PsClient::Create(spec.model(), assignment.partition(), std::move(stubs),
                       addresses, ps_options, view));
  if (assignment.backup_addresses_size() > 0) {
    // Replicated shards: fail over to a shard's backup when its primary is
    // unavailable; when both are, ask the scheduler where they are now.
    std::vector<std::string> backups(assignment.backup_addresses().begin(),
                                     assignment.backup_addresses().end());
    RpcMetrics* rpc = metrics.rpc.get();
    ps->SetBackups(
        std::move(backups),
        [rpc, security](const std::string& address)
            -> std::unique_ptr<ParameterServer::StubInterface> {
          return ParameterServer::NewStub(MakeChannel(address, rpc, security));
        },
        [&client](int shard) -> absl::StatusOr<PsClient::ShardNodes> {
          LMPS_ASSIGN_OR_RETURN(Assignment now,
                                client.WaitForAssignment(absl::Seconds(5)));
          if (shard >= now.shard_addresses_size()) {
            return absl::InternalError("no such shard in the assignment");
          }
          return PsClient::ShardNodes{
              now.shard_addresses(shard),
              shard < now.backup_addresses_size() ? now.backup_addresses(shard)
                                                  : ""};
        });
  }

  // A replacement joins a running job: start at the servers' version. In
  // the middle of an Apply the shards may differ by one; wait for the live
  // replicas to finish it.
  // In ASYNC mode versions count pushes, not steps, and differ between
  // shards all the time: the replica's clock says where to start.
  int64_t start_step = assignment.start_step();
  if (spec.train().mode() == ASYNC) {
    // ASYNC: resume at this replica's clock (steps it completely pushed):
    // a replacement neither repeats nor skips its predecessor's steps.
    absl::StatusOr<int64_t> clock = ps->ReplicaClock(assignment.dp_rank());
    for (int attempt = 0;
         clock.status().code() == absl::StatusCode::kUnavailable &&
         attempt * 0.1 < absl::GetFlag(FLAGS_rpc_timeout_s);
         ++attempt) {
      absl::SleepFor(absl::Milliseconds(100));  // a shard still starting up
      clock = ps->ReplicaClock(assignment.dp_rank());
    }
    LMPS_RETURN_IF_ERROR(clock.status());
    if (*clock > start_step) {
      Log(id, absl::StrCat("joining a running ASYNC job at step ", *clock,
                           " (dp rank ", assignment.dp_rank(),
                           "'s clock; replacing a lost worker)"));
      start_step = *clock;
    }
  }
  for (int attempt = 0; spec.train().mode() != ASYNC; ++attempt) {
    absl::StatusOr<std::vector<int64_t>> got = ps->Versions();
    if (got.status().code() == absl::StatusCode::kUnavailable &&
        attempt * 0.1 < absl::GetFlag(FLAGS_rpc_timeout_s)) {
      absl::SleepFor(absl::Milliseconds(100));  // a shard still starting up
      continue;
    }
    LMPS_RETURN_IF_ERROR(got.status());
    const std::vector<int64_t>& versions = *got;
    const auto [lo, hi] = std::minmax_element(versions.begin(), versions.end());
    if (*lo == *hi) {
      if (*lo > start_step) {
        Log(id, absl::StrCat("joining a running job at step ", *lo,
                             " (replacing a lost worker)"));
        start_step = *lo;
      }
      break;
    }
    if (attempt * 0.1 > absl::GetFlag(FLAGS_rpc_timeout_s)) {
      return absl::DeadlineExceededError(absl::StrCat(
          "shards stay at different versions (", *lo, " and ", *hi,
          "): an Apply was interrupted and no live replica completes it"));
    }
    absl::SleepFor(absl::Milliseconds(100));
  }

  DataParallelTrainerOptions options;
  options.worker_id = id;
  options.dp_rank = assignment.dp_rank();
  options.spec = spec;
  options.start_step = start_step;
  {
    const std::string overlap = absl::GetFlag(FLAGS_overlap_push);
    if (overlap != "auto" && overlap != "true" && overlap != "false") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--overlap_push must be auto, true or false, got '", overlap, "'"));
    }
    options.overlap_push =
        overlap == "true" ||
        (overlap == "auto" &&
         absl::StartsWith(absl::GetFlag(FLAGS_backend), "cuda"));
  }
  absl::Mutex mu;
  TrainerProgress latest;
  latest.step = start_step;
  SetGauge(m, "lmps_node_info", "Identity of this node (value 1).", 1,
           {{"node_id", id}, {"role", "worker"},
            {"dp_rank", std::to_string(assignment.dp_rank())},
            {"pp_rank", std::to_string(assignment.pp_rank())},
            {"tp_rank", std::to_string(assignment.tp_rank())}});
  options.on_progress = [&](const TrainerProgress& p) {
    SetGauge(m, "lmps_step", "Completed training steps.", static_cast<double>(p.step));
    SetGauge(m, "lmps_loss", "Training loss of the last step.", p.loss);
    if (std::isfinite(p.eval_loss)) {
      SetGauge(m, "lmps_eval_loss", "Last evaluation loss.", p.eval_loss);
    }
    SetGauge(m, "lmps_tokens_per_second", "Training tokens per second.",
             p.tokens_per_second);
    SetGauge(m, "lmps_staleness_steps",
             "Steps between the parameters used and the step computed.",
             static_cast<double>(p.staleness));
    const char* help = "Seconds of the last step spent per phase.";
    SetGauge(m, "lmps_step_phase_seconds", help, p.compute_seconds, {{"phase", "compute"}});
    SetGauge(m, "lmps_step_phase_seconds", help, p.pull_seconds, {{"phase", "pull"}});
    SetGauge(m, "lmps_step_phase_seconds", help, p.push_seconds, {{"phase", "push"}});
    SetGauge(m, "lmps_step_phase_seconds", help, p.sync_seconds, {{"phase", "wait"}});
    {
      const char* bytes =
          "Gradient payload bytes pushed in the last step (total), and those "
          "sent while its backward pass still ran (overlapped, "
          "--overlap_push).";
      SetGauge(m, "lmps_push_bytes", bytes, static_cast<double>(p.push_bytes),
               {{"kind", "total"}});
      SetGauge(m, "lmps_push_bytes", bytes,
               static_cast<double>(p.push_bytes_overlapped),
               {{"kind", "overlapped"}});
    }
    if (pipeline) {
      const char* bubble =
          "Fraction of the last step's pipeline schedule this stage waited "
          "for its neighbours (measured), and (pp - 1) / (m + pp - 1) (ideal).";
      SetGauge(m, "lmps_pipeline_bubble_fraction", bubble, p.bubble_fraction,
               {{"kind", "measured"}});
      SetGauge(m, "lmps_pipeline_bubble_fraction", bubble, p.ideal_bubble_fraction,
               {{"kind", "ideal"}});
      SetGauge(m, "lmps_pipeline_live_micro_batches",
               "Most micro-batches whose activations were alive at once in the "
               "last step.", p.max_live_micro_batches);
    }
    absl::MutexLock lock(&mu);
    latest = p;
  };
  // One of two loops: DataParallelTrainer (data parallel only) or PipelineTrainer.
  std::unique_ptr<GptModel> model;
  std::unique_ptr<DataParallelTrainer> trainer;
  std::unique_ptr<StageModel> stage_model;
  std::unique_ptr<PeerNetwork> peers;
  std::unique_ptr<RingAllReduce> ring;
  std::unique_ptr<PipelineTrainer> pipeline_trainer;
  if (!pipeline) {
    LMPS_ASSIGN_OR_RETURN(model, GptModel::Create(spec.model(), backend.get(), micro,
                                                  spec.model().block_size()));
    LMPS_ASSIGN_OR_RETURN(trainer, DataParallelTrainer::Create(options, model.get(), ps.get(),
                                                   data.get()));
  } else {
    std::vector<PeerInfo> workers(assignment.workers().begin(),
                                  assignment.workers().end());
    PeerNetworkOptions peer_net;
    peer_net.self_id = id;
    peer_net.self_rank = layout.Rank(coords);
    peer_net.max_message_bytes = spec.max_message_bytes();
    peer_net.timeout = absl::Milliseconds(spec.train().peer_timeout_ms());
    const Security* sec = &security;
    RpcMetrics* rpc = metrics.rpc.get();
    LMPS_ASSIGN_OR_RETURN(
        peers, PeerNetwork::Create(peer_net, std::move(workers), &mailbox,
                                   [sec, rpc](const std::string& address) {
                                     return WorkerPeer::NewStub(
                                         MakeChannel(address, rpc, *sec));
                                   }));
    if (layout.tp() > 1) {
      std::vector<int> group;
      for (int t = 0; t < layout.tp(); ++t) {
        group.push_back(layout.Rank({coords.dp, coords.pp, t}));
      }
      LMPS_ASSIGN_OR_RETURN(ring, RingAllReduce::Create(peers.get(), group, coords.tp));
    }
    const StageRange& stage = layout.stage(coords.pp);
    StageModelOptions so;
    so.config = spec.model();
    so.layer_begin = stage.layer_begin;
    so.layer_end = stage.layer_end;
    so.has_embedding = stage.has_embedding;
    so.has_head = stage.has_head;
    so.tp_size = layout.tp();
    so.tp_rank = coords.tp;
    so.max_batch = micro;
    so.max_seq = spec.model().block_size();
    so.activation_slots = PipelineTrainer::StageSlots(spec, coords.pp);
    LMPS_ASSIGN_OR_RETURN(stage_model, StageModel::Create(so, backend.get(), ring.get()));
    PipelineTrainerOptions po;
    po.worker_id = id;
    po.coords = coords;
    po.spec = spec;
    po.start_step = start_step;
    po.on_progress = options.on_progress;
    po.overlap_push = options.overlap_push;
    // The scheduler regroups the job (or, elastic, shrinks dp) once a dead
    // peer's lease (and then --elastic_grace_s, default 10 s) has passed.
    if (assignment.elastic()) po.resize_wait = 3 * client.lease() + absl::Seconds(60);
    if (absl::GetFlag(FLAGS_fault_kill_at_step) >= 0) {
      // Pipeline: die as the step's schedule starts, leaving the stage and
      // tensor-parallel partners mid-step.
      const int64_t kill_step = absl::GetFlag(FLAGS_fault_kill_at_step);
      po.on_step_start = [id, kill_step](int64_t step) {
        if (step != kill_step) return;
        Log(id, absl::StrCat("fault injection: SIGKILL at the start of step ", step));
        raise(SIGKILL);
      };
    }
    LMPS_ASSIGN_OR_RETURN(
        pipeline_trainer,
        PipelineTrainer::Create(po, &layout, stage_model.get(), ps.get(),
                                peers.get(), ring.get(), data.get()));
    Log(id, absl::StrCat("pipeline stage ", coords.pp, " of ", layout.pp(),
                         " (layers ", stage.layer_begin, "-", stage.layer_end - 1,
                         stage.has_embedding ? ", embeddings" : "",
                         stage.has_head ? ", head" : "", "), tp rank ",
                         coords.tp, " of ", layout.tp(), ", schedule ",
                         PipelineSchedule_Name(spec.layout().schedule()), " with ",
                         spec.train().micro_batches(), " micro-batches, ",
                         so.activation_slots, " activation slots, ",
                         stage_model->num_parameters(), " parameters held"));
  }

  bool done = false;
  bool stopped_for_resize = false;
  std::atomic<bool> peers_lost{false};
  std::atomic<bool> failure_logged{false};
  std::string error;
  auto make_heartbeat = [&] {
    absl::MutexLock lock(&mu);
    HeartbeatRequest hb;
    hb.set_stopped_for_resize(stopped_for_resize);
    hb.set_step(latest.step);
    hb.set_loss(latest.loss);
    hb.set_eval_loss(latest.eval_loss);
    hb.set_tokens_per_second(latest.tokens_per_second);
    hb.set_done(done);
    hb.set_error(error);
    return hb;
  };
  HeartbeatLoop heartbeat(
      &client, client.lease() / 3, make_heartbeat,
      [&](const absl::StatusOr<HeartbeatResponse>& r) {
        if (r.ok() && r->state() == FAILED && !failure_logged.exchange(true)) {
          Log(id, absl::StrCat("the job failed: ", r->message(), "; stopping"));
          if (trainer) trainer->Cancel();
          if (pipeline_trainer) pipeline_trainer->Cancel();
        }
        if (r.ok() && r->fenced() && !failure_logged.exchange(true)) {
          // Its slot went to a newer process while this one was cut off
          // or frozen past its lease.
          Log(id, "the scheduler gave this worker's slot to a newer "
                  "registration; stopping");
          if (trainer) trainer->Cancel();
          if (pipeline_trainer) pipeline_trainer->Cancel();
        }
        if (r.ok() && r->peers_lost() && pipeline && !peers_lost.exchange(true)) {
          // Nothing more comes from the lost peer: end the waits now (the
          // step fails UNAVAILABLE and the trainer awaits the stop).
          Log(id, "the scheduler reports a lost worker: the job regroups; "
                  "ending the waits for peers");
          mailbox.Shutdown();
        }
      });

  absl::Status status = trainer ? trainer->Run() : pipeline_trainer->Run();
  if (!status.ok() && pipeline) mailbox.Shutdown();
  if (ReasonOf(status) == STOPPED_FOR_RESIZE) {
    // Elastic resize: the shards stopped the job at a step boundary and
    // checkpointed it; the job restarts with another dp. Not a failure.
    heartbeat.Stop();
    Log(id, absl::StrCat("stopped for an elastic resize: ", status.message()));
    if (assignment.elastic()) {
      // The scheduler re-assembles the job once every worker stopped: say
      // so, then register again (main() runs RunWorker again).
      {
        absl::MutexLock lock(&mu);
        stopped_for_resize = true;
      }
      absl::StatusOr<HeartbeatResponse> told = heartbeat.BeatNow();
      for (int i = 0; i < 20 && !told.ok(); ++i) {
        absl::SleepFor(absl::Milliseconds(250));
        told = heartbeat.BeatNow();
      }
      *register_again = true;
    }
    return absl::OkStatus();
  }
  // With pp * tp > 1 no worker holds the whole model: lmps_local samples
  // from the exported model instead (lmps_eval).
  if (status.ok() && trainer && assignment.dp_rank() == 0 &&
      spec.train().sample_tokens() > 0) {
    absl::StatusOr<std::string> sample = trainer->Sample(
        absl::GetFlag(FLAGS_sample_prompt), spec.train().sample_tokens(),
        static_cast<float>(absl::GetFlag(FLAGS_sample_temperature)),
        absl::GetFlag(FLAGS_sample_top_k));
    if (!sample.ok()) {
      status = sample.status();
    } else {
      Log(id, absl::StrCat("sample after step ", trainer->end_step(), ":\n",
                           *sample));
      const std::string out = absl::GetFlag(FLAGS_sample_out);
      if (!out.empty()) {
        std::ofstream f(out);
        f << *sample;
        if (!f) status = absl::InternalError(absl::StrCat("cannot write ", out));
      }
    }
  }
  {
    absl::MutexLock lock(&mu);
    done = status.ok();
    if (!status.ok()) error = std::string(status.message());
  }
  heartbeat.Stop();
  // The final report (done or the error) must reach the scheduler, which
  // may be restarting: retry while it is unreachable, up to a minute.
  absl::StatusOr<HeartbeatResponse> last = heartbeat.BeatNow();
  for (const absl::Time give_up = absl::Now() + absl::Seconds(60);
       !last.ok() && absl::Now() < give_up &&
       (last.status().code() == absl::StatusCode::kUnavailable ||
        last.status().code() == absl::StatusCode::kDeadlineExceeded);
       last = heartbeat.BeatNow()) {
    absl::SleepFor(absl::Milliseconds(500));
  }
  if (!last.ok()) Log(id, std::string(last.status().message()));
  if (!status.ok() && last.ok() && last->state() == FAILED &&
      !failure_logged.exchange(true)) {
    // This worker's error may be a consequence (a shard that stopped
    // because the job failed): say what failed the job first.
    Log(id, absl::StrCat("the job failed: ", last->message()));
  }
  if (status.ok()) {
    const TrainerProgress& p =
        trainer ? trainer->progress() : pipeline_trainer->progress();
    Log(id, absl::StrFormat("done: step %d loss %.4f eval %.4f %.0f tokens/s",
                            p.step, p.loss, p.eval_loss, p.tokens_per_second));
    // Read by tests/pipeline_test (no worker moves parameters it does not
    // own) and bench/pipeline_bench.sh.
    Log(id, absl::StrFormat(
                "transfer: pulls=%d bytes_pulled=%d bytes_pushed=%d "
                "peer_bytes_sent=%d held_parameters=%d",
                pipeline_trainer ? pipeline_trainer->pulls() : 0,
                ps->stats().bytes_pulled.load(), ps->stats().bytes_pushed.load(),
                peers ? peers->bytes_sent() : 0, ps->num_parameters()));
  }
  return status;
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  lmps::TuneAllocatorForLargeBuffers();
  absl::SetProgramUsageMessage(
      "lmps training worker: lmps_worker --scheduler=host:port [--backend=cpu]");
  absl::ParseCommandLine(argc, argv);
  std::signal(SIGPIPE, SIG_IGN);
  absl::Status status;
  for (bool again = true; again;) {
    again = false;
    status = lmps::RunWorker(&again);
    if (!status.ok()) break;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "[worker] error: %s\n", status.ToString().c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
