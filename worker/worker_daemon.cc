#include "worker/worker_daemon.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/clients/scheduler_client.h"
#include "common/model/job_spec.h"
#include "common/model/parallel_layout.h"
#include "common/rpc/daemon_metrics.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
#include "proto/lmps.grpc.pb.h"
#include "worker/data/create_dataset.h"
#include "worker/fault_injection.h"
#include "worker/data/dataset.h"
#include "worker/model/gpt.h"
#include "worker/model/stage_model.h"
#include "worker/peer/mailbox.h"
#include "worker/peer/peer_endpoint.h"
#include "worker/peer/peer_network.h"
#include "worker/peer/ring_allreduce.h"
#include "worker/pipeline/pipeline_trainer.h"
#include "worker/progress_export.h"
#include "worker/ps_client.h"
#include "worker/resume_step.h"
#include "worker/step_log.h"
#include "worker/trainer.h"
#include "worker/training_loop.h"
#include "worker/worker_log.h"

namespace lmps {
namespace {

absl::Status Stopped() { return absl::CancelledError("stopped"); }

// What joining the job came to.
enum class JoinResult {
  kJoined,       // registered and assigned: train
  kJobFinished,  // the job finished without needing this worker
};

// How one registration ended when it did not fail.
enum class SessionEnd {
  kFinished,       // the job finished (or this worker is not needed)
  kRegisterAgain,  // stopped for a resize or regroup: register again
};

// One registration of this worker with the scheduler, from starting its
// resources to the final report (the steps of worker_daemon.h). The members
// are declared in the order they are made, so that they are destroyed in
// the reverse: the heartbeat and the training loop first, then the PS
// client, the WorkerPeer service, the scheduler client, the backend and
// /metrics last.
class WorkerSession {
 public:
  WorkerSession(const WorkerDaemonOptions& options, StopSignal* stop)
      : options_(options), stop_(stop), log_(options.log) {}

  absl::StatusOr<SessionEnd> Run() {
    LMPS_RETURN_IF_ERROR(Start());
    LMPS_ASSIGN_OR_RETURN(const JoinResult joined, Join());
    if (joined == JoinResult::kJobFinished) return SessionEnd::kFinished;
    LMPS_RETURN_IF_ERROR(Connect());
    LMPS_RETURN_IF_ERROR(Resume());
    LMPS_RETURN_IF_ERROR(BuildTrainer());
    return Train();
  }

 private:
  // Step 1: /metrics, the backend, the scheduler client, the peer service.
  absl::Status Start() {
    threads_ = options_.threads;
    if (threads_ <= 0) {
      threads_ = std::max<int>(1, std::thread::hardware_concurrency() /
                                      std::max(1, options_.workers_per_host));
    }
    LMPS_ASSIGN_OR_RETURN(
        metrics_, StartDaemonMetrics(options_.metrics_listen, "worker"));
    // Fail fast on a backend this machine cannot run, before joining a job.
    LMPS_ASSIGN_OR_RETURN(backend_,
                          options_.backend_factory(options_.backend, threads_,
                                                   options_.cuda_matmul,
                                                   options_.cuda_backend_lib));
    // Says which backend computes (tests check that --backend=cuda never
    // falls back to the CPU).
    const std::string notes = backend_->notes();
    log_("worker", absl::StrCat("backend ", std::string(backend_->name()),
                                " (--backend=", options_.backend, ")",
                                notes.empty() ? "" : ": ", notes));
    LMPS_ASSIGN_OR_RETURN(security_, Security::Load(options_.security));
    client_ = std::make_unique<SchedulerClient>(
        Scheduler::NewStub(
            MakeChannel(options_.scheduler, metrics_.rpc.get(), security_)),
        options_.scheduler);
    PeerEndpointOptions peer;
    peer.listen = options_.peer_listen;
    peer.advertise_host = options_.advertise_host;
    peer.security = security_;
    peer.peer_security = options_.peer_security;
    peer.metrics = metrics_.metrics.get();
    peer.rpc = metrics_.rpc.get();
    peer.warn = [log = log_](const std::string& line) { log("worker", line); };
    LMPS_ASSIGN_OR_RETURN(peer_, PeerEndpoint::Start(peer));
    return absl::OkStatus();
  }

  // Step 2: registration (a spare's wait, a surplus worker's standby) and
  // the assignment.
  absl::StatusOr<JoinResult> Join() {
    register_request_.set_role(WORKER);
    register_request_.set_address(peer_->address());
    register_request_.set_requested_rank(options_.rank);
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    register_request_.set_hostname(
        options_.host_name.empty() ? std::string(host) : options_.host_name);
    register_request_.set_instance_id(
        absl::StrCat(host, "/", getpid(), "/", absl::ToUnixNanos(absl::Now())));
    if (options_.spare) {
      LMPS_ASSIGN_OR_RETURN(const JobState state, WaitUntilRunning());
      if (state != RUNNING) return JoinResult::kJobFinished;
    }
    absl::StatusOr<RegisterResponse> registered = client_->Register(
        register_request_,
        options_.spare ? options_.spare_wait : options_.assemble_timeout);
    // A surplus worker of an elastic job (every slot held, dp at its
    // largest or not enough surplus for a replica yet) stands by and keeps
    // asking: it joins when dp grows or takes a dead worker's slot, and
    // exits 0 when the job finishes without it.
    for (bool said = false; ReasonOf(registered.status()) == ELASTIC_SURPLUS;) {
      if (!said) {
        log_("worker",
             "surplus worker of an elastic job: standing by until dp "
             "grows or a worker's slot is free");
        said = true;
      }
      if (stop_->stopped()) return Stopped();
      registered =
          client_->Register(register_request_, options_.assemble_timeout);
    }
    if (ReasonOf(registered.status()) == JOB_FINISHED) {
      // A spare, a surplus worker of an elastic job, or a replacement that
      // came too late: nothing left to do.
      log_("worker", "the job finished without needing this worker");
      return JoinResult::kJobFinished;
    }
    LMPS_RETURN_IF_ERROR(registered.status());
    id_ = client_->node_id();
    log_(id_, absl::StrCat("registered with scheduler ", options_.scheduler,
                           " (", security_.Describe(),
                           "); waiting for the job to assemble"));
    LMPS_ASSIGN_OR_RETURN(
        assignment_, client_->WaitForAssignment(options_.assemble_timeout));
    // Heartbeat from here on: the steps before training (the dataset, the
    // model's buffers, the peers) can outlast the lease on a big model or a
    // busy machine, and a worker that is only setting up must keep its slot.
    // OnHeartbeat acts on the answers once training runs.
    {
      absl::MutexLock lock(&mu_);
      latest_.step = assignment_.start_step();  // until Resume knows better
    }
    heartbeat_ = std::make_unique<HeartbeatLoop>(
        client_.get(), client_->lease() / 3, [this] { return MakeHeartbeat(); },
        [this](const absl::StatusOr<HeartbeatResponse>& r) { OnHeartbeat(r); });
    spec_ = assignment_.spec();
    if (!options_.data.empty()) spec_.mutable_data()->set_path(options_.data);
    log_(id_, absl::StrCat("assigned dp rank ", assignment_.dp_rank(), " of ",
                           spec_.layout().dp(), ", ",
                           assignment_.shard_addresses_size(),
                           " shards, resume step ", assignment_.start_step(),
                           ", backend ", std::string(backend_->name()),
                           " with ", threads_, " threads"));
    return JoinResult::kJoined;
  }

  // A spare never takes a slot meant for a first worker: it waits until the
  // job runs. Returns RUNNING, or FINISHED when the job finished first.
  absl::StatusOr<JobState> WaitUntilRunning() {
    auto status_stub = Scheduler::NewStub(
        MakeChannel(options_.scheduler, metrics_.rpc.get(), security_));
    const absl::Time give_up = absl::Now() + options_.spare_wait;
    JobStatus status;
    while (true) {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
      status.Clear();
      const bool ok =
          status_stub->GetStatus(&ctx, GetStatusRequest(), &status).ok();
      if (ok && status.state() == RUNNING) break;
      if (ok && status.state() == FINISHED) {
        log_("worker", "spare: the job finished without needing this spare");
        return FINISHED;
      }
      if (ok && status.state() == FAILED) {
        return absl::AbortedError(
            absl::StrCat("spare: the job FAILED: ", status.message()));
      }
      if (absl::Now() > give_up) {
        return absl::DeadlineExceededError(
            absl::StrCat("spare: the job at ", options_.scheduler,
                         " did not start running within ",
                         absl::ToInt64Seconds(options_.spare_wait), " s"));
      }
      if (stop_->WaitFor(absl::Milliseconds(100))) return Stopped();
    }
    log_("worker",
         "spare: waiting for a slot of the running job (a worker "
         "whose lease expired)");
    return RUNNING;
  }

  // Step 3: the dataset, the layout, and the PsClient to the shards.
  absl::Status Connect() {
    LMPS_ASSIGN_OR_RETURN(data_, CreateDataset(spec_));
    micro_ = LocalBatch(spec_) / spec_.train().micro_batches();
    LMPS_ASSIGN_OR_RETURN(
        layout_, ParallelLayout::Create(spec_.model(), spec_.layout()));
    pipeline_ = layout_->pp() * layout_->tp() > 1;
    coords_ = WorkerCoords{assignment_.dp_rank(), assignment_.pp_rank(),
                           assignment_.tp_rank()};
    {
      // If the scheduler restarts, take this rank back from the new one.
      RegisterRequest rejoin = register_request_;
      rejoin.set_requested_rank(layout_->Rank(coords_));
      client_->EnableRejoin(rejoin);
    }
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    std::vector<std::string> addresses(assignment_.shard_addresses().begin(),
                                       assignment_.shard_addresses().end());
    for (const std::string& a : addresses) {
      channels.push_back(MakeChannel(a, metrics_.rpc.get(), security_));
    }
    PsClientOptions ps_options;
    // RING_ALLREDUCE: the replicas' copies of the parameters and the shards'
    // master must stay equal, so the one pull and dp rank 0's pushes are
    // exact fp32 (job_spec rejects train.pull_dtype BF16 there).
    const bool ring = spec_.train().dp_aggregation() == RING_ALLREDUCE;
    ps_options.push_dtype = ring ? F32 : options_.push_dtype;
    if (ring && options_.push_dtype != F32) {
      log_(id_, "--push_dtype ignored: train.dp_aggregation RING_ALLREDUCE "
                "pushes the averaged gradient in fp32");
    }
    ps_options.pull_dtype =
        ring ? F32
             : ResolvePullDtype(spec_.train().pull_dtype(), options_.backend);
    if (ps_options.pull_dtype == BF16) {
      log_(id_, absl::StrCat(
                    "pulls parameters in bf16 (train.pull_dtype ",
                    spec_.train().pull_dtype() == DTYPE_UNSPECIFIED
                        ? "unset: the default with a CUDA backend"
                        : "BF16",
                    "): half the bytes, each value rounded to nearest even"));
    }
    ps_options.rpc_timeout = options_.rpc_timeout;
    ps_options.max_message_bytes = spec_.max_message_bytes();
    ps_options.max_push_stream_bytes = spec_.max_push_stream_bytes();
    ps_options.streams_per_shard = spec_.streams_per_shard();
    ps_options.compression = spec_.train().compression();
    ps_options.seed = spec_.train().seed();
    ps_options.shared_memory = spec_.shared_memory() == SHARED_MEMORY_AUTO;
    ps_options.log = LineLog();
    if (!pipeline_ && options_.fault_kill_at_step >= 0) {
      ps_options.on_shard_push =
          KillMidPush(options_.fault_kill_at_step, LineLog());
    }
    PsClientView view;
    if (pipeline_) {
      view.layout = &*layout_;
      view.pp_rank = coords_.pp;
      view.tp_rank = coords_.tp;
    }
    LMPS_ASSIGN_OR_RETURN(
        ps_, PsClient::Create(spec_.model(), assignment_.partition(),
                              std::move(channels), addresses, ps_options, view));
    if (assignment_.backup_addresses_size() > 0) EnableFailover();
    return absl::OkStatus();
  }

  // A line logger for hooks that outlive no one but may run on any thread.
  FaultLog LineLog() const {
    return [log = log_, id = id_](const std::string& line) { log(id, line); };
  }

  // Replicated shards: fail over to a shard's backup when its primary is
  // unavailable; when both are, ask the scheduler where they are now.
  void EnableFailover() {
    std::vector<std::string> backups(assignment_.backup_addresses().begin(),
                                     assignment_.backup_addresses().end());
    RpcMetrics* rpc = metrics_.rpc.get();
    ps_->SetBackups(
        std::move(backups),
        [rpc, security = security_](const std::string& address) {
          return MakeChannel(address, rpc, security);
        },
        [client =
             client_.get()](int shard) -> absl::StatusOr<PsClient::ShardNodes> {
          LMPS_ASSIGN_OR_RETURN(Assignment now,
                                client->WaitForAssignment(absl::Seconds(5)));
          if (shard >= now.shard_addresses_size()) {
            return absl::InternalError("no such shard in the assignment");
          }
          return PsClient::ShardNodes{now.shard_addresses(shard),
                                      shard < now.backup_addresses_size()
                                          ? now.backup_addresses(shard)
                                          : ""};
        });
  }

  // Step 4: the step to start at (worker/resume_step.h).
  absl::Status Resume() {
    LMPS_ASSIGN_OR_RETURN(
        start_step_,
        ResumeStep(ps_.get(), spec_.train().mode(), assignment_.dp_rank(),
                   assignment_.start_step(), options_.rpc_timeout,
                   [this](const std::string& line) { log_(id_, line); }));
    return absl::OkStatus();
  }

  // Step 5: the training loop, DataParallelTrainer (data parallel only) or
  // PipelineTrainer.
  absl::Status BuildTrainer() {
    TrainingLoopOptions common;
    common.worker_id = id_;
    common.spec = spec_;
    common.start_step = start_step_;
    common.log = log_.For(id_);
    // The scheduler regroups the job (or, elastic, shrinks dp) once a dead
    // peer's lease (and then --elastic_grace_s, default 10 s) has passed.
    if (assignment_.elastic() && WorkersNeedPeers(spec_)) {
      common.resize_wait = 3 * client_->lease() + absl::Seconds(60);
    }
    const bool overlap_push =
        options_.overlap_push == OverlapPush::kOn ||
        (options_.overlap_push == OverlapPush::kAuto &&
         IsCudaBackendName(options_.backend));
    {
      absl::MutexLock lock(&mu_);
      latest_.step = start_step_;
    }
    SetGauge(metrics_.metrics.get(), "lmps_node_info",
             "Identity of this node (value 1).", 1,
             {{"node_id", id_},
              {"role", "worker"},
              {"dp_rank", std::to_string(assignment_.dp_rank())},
              {"pp_rank", std::to_string(assignment_.pp_rank())},
              {"tp_rank", std::to_string(assignment_.tp_rank())}});
    common.on_progress = [this](const TrainerProgress& p) { OnProgress(p); };
    StartProgressExport();
    if (pipeline_) return BuildPipelineTrainer(common, overlap_push);
    LMPS_ASSIGN_OR_RETURN(
        model_, GptModel::Create(spec_.model(), backend_.get(), micro_,
                                 spec_.model().block_size()));
    DataParallelTrainerOptions options;
    static_cast<TrainingLoopOptions&>(options) = common;
    options.dp_rank = assignment_.dp_rank();
    options.overlap_push = overlap_push;
    options.pull_with_push = options_.pull_with_push;
    options.layerwise_pull =
        ResolveLayerwisePull(spec_.train().layerwise_pull(), options_.backend);
    if (spec_.train().dp_aggregation() == RING_ALLREDUCE) {
      // Every worker of the job.
      LMPS_ASSIGN_OR_RETURN(options.dp_ring, CreateDpRing(0, layout_->dp()));
    }
    if (const int w = WorkersPerHost(spec_); w > 1) {
      // The host group: dp ranks hW .. hW + W - 1 (the scheduler gave the
      // workers of one host one group).
      LMPS_ASSIGN_OR_RETURN(options.host_ring,
                            CreateDpRing(coords_.dp / w * w, w));
    }
    LMPS_ASSIGN_OR_RETURN(
        std::unique_ptr<DataParallelTrainer> trainer,
        DataParallelTrainer::Create(options, model_.get(), ps_.get(),
                                    data_.get()));
    whole_model_trainer_ = trainer.get();
    loop_ = std::move(trainer);
    return absl::OkStatus();
  }

  // ring_: a ring all-reduce over the workers of dp ranks [first, first +
  // size), in dp-rank order (pp = tp = 1, so worker rank = dp rank), over
  // the peer network, which it creates.
  absl::StatusOr<TpComm*> CreateDpRing(int first, int size) {
    LMPS_RETURN_IF_ERROR(CreatePeerNetwork());
    std::vector<int> group;
    for (int d = first; d < first + size; ++d) {
      group.push_back(layout_->Rank({d, 0, 0}));
    }
    LMPS_ASSIGN_OR_RETURN(
        ring_, RingAllReduce::Create(peers_.get(), group, coords_.dp - first));
    return ring_.get();
  }

  // peers_: this worker's view of the job's workers (pipeline, tensor
  // parallel, and data-parallel rings: RING_ALLREDUCE and host groups).
  absl::Status CreatePeerNetwork() {
    std::vector<PeerInfo> workers(assignment_.workers().begin(),
                                  assignment_.workers().end());
    PeerNetworkOptions peer_net;
    peer_net.self_id = id_;
    peer_net.self_rank = layout_->Rank(coords_);
    peer_net.max_message_bytes = spec_.max_message_bytes();
    peer_net.timeout = absl::Milliseconds(spec_.train().peer_timeout_ms());
    peer_net.shared_memory = spec_.shared_memory() == SHARED_MEMORY_AUTO;
    peer_net.log = LineLog();
    RpcMetrics* rpc = metrics_.rpc.get();
    LMPS_ASSIGN_OR_RETURN(
        peers_,
        PeerNetwork::Create(
            peer_net, std::move(workers), peer_->mailbox(),
            [security = security_, rpc](const std::string& address) {
              return MakeChannel(address, rpc, security);
            }));
    return absl::OkStatus();
  }

  // The pipeline loop: the peer network, the tensor-parallel ring (tp > 1),
  // this stage's model and the PipelineTrainer.
  absl::Status BuildPipelineTrainer(const TrainingLoopOptions& common,
                                    bool overlap_push) {
    LMPS_RETURN_IF_ERROR(CreatePeerNetwork());
    if (layout_->tp() > 1) {
      std::vector<int> group;
      for (int t = 0; t < layout_->tp(); ++t) {
        group.push_back(layout_->Rank({coords_.dp, coords_.pp, t}));
      }
      LMPS_ASSIGN_OR_RETURN(
          ring_, RingAllReduce::Create(peers_.get(), group, coords_.tp));
    }
    const StageModelOptions so =
        PipelineTrainer::StageOptions(spec_, *layout_, coords_, micro_);
    const StageRange& stage = layout_->stage(coords_.pp);
    LMPS_ASSIGN_OR_RETURN(stage_model_,
                          StageModel::Create(so, backend_.get(), ring_.get()));
    PipelineTrainerOptions po;
    static_cast<TrainingLoopOptions&>(po) = common;
    po.coords = coords_;
    po.overlap_push = overlap_push;
    if (options_.fault_kill_at_step >= 0) {
      po.on_step_start =
          KillAtStepStart(options_.fault_kill_at_step, LineLog());
    }
    LMPS_ASSIGN_OR_RETURN(
        loop_,
        PipelineTrainer::Create(po, &*layout_, stage_model_.get(), ps_.get(),
                                peers_.get(), ring_.get(), data_.get()));
    log_(id_, absl::StrCat(
                  "pipeline stage ", coords_.pp, " of ", layout_->pp(),
                  " (layers ", stage.layer_begin, "-", stage.layer_end - 1,
                  stage.has_embedding ? ", embeddings" : "",
                  stage.has_head ? ", head" : "", "), tp rank ", coords_.tp,
                  " of ", layout_->tp(), ", schedule ",
                  PipelineSchedule_Name(spec_.layout().schedule()), " with ",
                  spec_.train().micro_batches(), " micro-batches, ",
                  so.activation_slots, " activation slots, ",
                  stage_model_->num_parameters(), " parameters held"));
    return absl::OkStatus();
  }

  // The step log (options_.step_log) and the progress gauges, fed from
  // OnProgress.
  void StartProgressExport() {
    StepLogIdentity who;
    who.node = id_;
    who.dp = assignment_.dp_rank();
    who.pp = assignment_.pp_rank();
    who.tp = assignment_.tp_rank();
    who.pipeline = pipeline_;
    progress_export_ = std::make_unique<ProgressExport>(
        metrics_.metrics.get(), options_.step_log, std::move(who),
        [log = log_, id = id_](const std::string& line) { log(id, line); });
  }

  // The trainer's progress: exported (the step log, the gauges) and sent in
  // heartbeats.
  void OnProgress(const TrainerProgress& p) {
    if (progress_export_ != nullptr) progress_export_->Export(p);
    absl::MutexLock lock(&mu_);
    latest_ = p;
  }

  void CancelTraining() {
    if (loop_) loop_->Cancel();
  }

  HeartbeatRequest MakeHeartbeat() {
    absl::MutexLock lock(&mu_);
    HeartbeatRequest hb;
    hb.set_stopped_for_resize(stopped_for_resize_);
    hb.set_step(latest_.step);
    hb.set_loss(latest_.loss);
    hb.set_eval_loss(latest_.eval_loss);
    hb.set_tokens_per_second(latest_.tokens_per_second);
    hb.set_push_wire_bytes(latest_.push_bytes);
    hb.set_pull_wire_bytes(latest_.pull_bytes);
    if (std::isfinite(latest_.learning_rate)) {
      hb.set_lr(static_cast<float>(latest_.learning_rate));
    }
    hb.set_done(done_);
    hb.set_error(error_);
    return hb;
  }

  // Runs on the heartbeat thread. Before training the answers are not acted
  // on (the training loop and the peers are still being made); a failed
  // job, a fence or a lost peer is told again by every later heartbeat.
  void OnHeartbeat(const absl::StatusOr<HeartbeatResponse>& r) {
    if (!training_.load(std::memory_order_acquire)) return;
    if (r.ok() && r->state() == FAILED && !failure_logged_.exchange(true)) {
      log_(id_, absl::StrCat("the job failed: ", r->message(), "; stopping"));
      CancelTraining();
    }
    if (r.ok() && r->fenced() && !failure_logged_.exchange(true)) {
      // Its slot went to a newer process while this one was cut off or
      // frozen past its lease.
      log_(id_,
           "the scheduler gave this worker's slot to a newer "
           "registration; stopping");
      CancelTraining();
    }
    if (r.ok() && r->peers_lost() && (pipeline_ || ring_ != nullptr) &&
        !peers_lost_.exchange(true)) {
      // Nothing more comes from the lost peer: end the waits now (the step
      // fails UNAVAILABLE and the trainer awaits the stop).
      log_(id_,
           "the scheduler reports a lost worker: the job regroups; "
           "ending the waits for peers");
      peer_->mailbox()->Shutdown();
    }
    if (r.ok() && r->reassemble() && !reassembled_.exchange(true)) {
      log_(id_, kReassembledWithout);
      if (pipeline_ || ring_ != nullptr) peer_->mailbox()->Shutdown();
      CancelTraining();
    }
  }

  // The job regrouped and re-assembled without this worker: its lease
  // expired while it was alive (frozen, or cut off from the scheduler), so
  // it never stopped for the regroup, and the step it is in belongs to the
  // old assembly. Said by a heartbeat's answer (OnHeartbeat), or by the
  // final report's (Report): the step may fail on the re-assembled shards
  // before a heartbeat tells, and the scheduler ignores that report.
  static constexpr char kReassembledWithout[] =
      "the job re-assembled without this worker (its lease expired while it "
      "was alive): dropping the step in progress to register again";

  // Step 6: trains while heartbeating, then reports.
  absl::StatusOr<SessionEnd> Train() {
    if (stop_->stopped()) return Stopped();
    // Publishes loop_, ring_ and pipeline_ to the heartbeat thread.
    training_.store(true, std::memory_order_release);
    stop_->OnStop([this] { CancelTraining(); });
    absl::Status status = loop_->Run();
    stop_->OnStop(nullptr);
    if (!status.ok() && (pipeline_ || ring_ != nullptr)) {
      peer_->mailbox()->Shutdown();
    }
    if (!status.ok() && stop_->stopped()) {
      heartbeat_->Stop();
      log_(id_, "stopped; not reporting to the scheduler");
      return Stopped();
    }
    if (ReasonOf(status) == STOPPED_FOR_RESIZE) return EndForResize(status);
    if (reassembled_.load()) {
      heartbeat_->Stop();
      return SessionEnd::kRegisterAgain;
    }
    // With pp * tp > 1 no worker holds the whole model: lmps_local samples
    // from the exported model instead (lmps_eval).
    if (status.ok() && whole_model_trainer_ && assignment_.dp_rank() == 0 &&
        spec_.train().sample_tokens() > 0) {
      status = Sample();
    }
    Report(status);
    if (reassembled_.load()) return SessionEnd::kRegisterAgain;
    if (status.ok()) LogSummary();
    LMPS_RETURN_IF_ERROR(status);
    return SessionEnd::kFinished;
  }

  // Elastic resize: the shards stopped the job at a step boundary and
  // checkpointed it; the job restarts with another dp. Not a failure.
  SessionEnd EndForResize(const absl::Status& status) {
    heartbeat_->Stop();
    log_(id_,
         absl::StrCat("stopped for an elastic resize: ", status.message()));
    if (!assignment_.elastic()) return SessionEnd::kFinished;
    // The scheduler re-assembles the job once every worker stopped: say so,
    // then register again.
    {
      absl::MutexLock lock(&mu_);
      stopped_for_resize_ = true;
    }
    absl::StatusOr<HeartbeatResponse> told = heartbeat_->BeatNow();
    for (int i = 0; i < 20 && !told.ok(); ++i) {
      absl::SleepFor(absl::Milliseconds(250));
      told = heartbeat_->BeatNow();
    }
    return SessionEnd::kRegisterAgain;
  }

  // Generates the sample (data-parallel rank 0), logs it and writes it to
  // sample_out.
  absl::Status Sample() {
    LMPS_ASSIGN_OR_RETURN(
        const std::string sample,
        whole_model_trainer_->Sample(options_.sample_prompt, spec_.train().sample_tokens(),
                         static_cast<float>(options_.sample_temperature),
                         options_.sample_top_k));
    log_(id_, absl::StrCat("sample after step ", loop_->end_step(), ":\n",
                           sample));
    if (!options_.sample_out.empty()) {
      std::ofstream f(options_.sample_out);
      f << sample;
      if (!f) {
        return absl::InternalError(
            absl::StrCat("cannot write ", options_.sample_out));
      }
    }
    return absl::OkStatus();
  }

  // The final report (done or the error) must reach the scheduler, which
  // may be restarting: retry while it is unreachable, up to a minute. An
  // answer "reassemble" (the scheduler ignored the report) sets
  // reassembled_: the worker registers again.
  void Report(const absl::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      done_ = status.ok();
      if (!status.ok()) error_ = std::string(status.message());
    }
    heartbeat_->Stop();
    absl::StatusOr<HeartbeatResponse> last = heartbeat_->BeatNow();
    for (const absl::Time give_up = absl::Now() + absl::Seconds(60);
         !last.ok() && absl::Now() < give_up &&
         (last.status().code() == absl::StatusCode::kUnavailable ||
          last.status().code() == absl::StatusCode::kDeadlineExceeded);
         last = heartbeat_->BeatNow()) {
      absl::SleepFor(absl::Milliseconds(500));
    }
    if (!last.ok()) log_(id_, std::string(last.status().message()));
    if (last.ok() && last->reassemble() && !reassembled_.exchange(true)) {
      log_(id_, kReassembledWithout);
      return;
    }
    if (!status.ok() && last.ok() && last->state() == FAILED &&
        !failure_logged_.exchange(true)) {
      // This worker's error may be a consequence (a shard that stopped
      // because the job failed): say what failed the job first.
      log_(id_, absl::StrCat("the job failed: ", last->message()));
    }
  }

  void LogSummary() {
    const TrainerProgress& p = loop_->progress();
    if (start_step_ >= loop_->end_step()) {
      // Resumed at the job's last step: no loss or throughput to report.
      log_(id_, absl::StrFormat("done: step %d: nothing to train (the job "
                                "resumed at its last step)",
                                loop_->end_step()));
    } else {
      log_(id_,
           absl::StrFormat("done: step %d loss %.4f eval %.4f %.0f tokens/s",
                           p.step, p.loss, p.eval_loss, p.tokens_per_second));
    }
    // Read by tests/pipeline_test (no worker moves parameters it does not
    // own) and worker_daemon_test.
    log_(id_,
         absl::StrFormat(
             "transfer: pulls=%d bytes_pulled=%d bytes_pushed=%d "
             "peer_bytes_sent=%d held_parameters=%d bytes_shared=%d "
             "peer_bytes_shared=%d",
             p.pulls,
             ps_->stats().bytes_pulled.load(), ps_->stats().bytes_pushed.load(),
             peers_ ? peers_->bytes_sent() : 0, ps_->num_parameters(),
             ps_->stats().bytes_shared.load(),
             peers_ ? peers_->bytes_shared() : 0));
  }

  const WorkerDaemonOptions& options_;
  StopSignal* const stop_;
  const WorkerLog log_;

  int threads_ = 0;
  DaemonMetrics metrics_;
  std::unique_ptr<Backend> backend_;
  Security security_;
  std::unique_ptr<SchedulerClient> client_;
  std::unique_ptr<PeerEndpoint> peer_;

  RegisterRequest register_request_;
  std::string id_;  // the node id, once registered
  Assignment assignment_;
  JobSpec spec_;
  std::unique_ptr<Dataset> data_;
  int micro_ = 0;  // the micro-batch size
  std::optional<ParallelLayout> layout_;
  bool pipeline_ = false;  // pp * tp > 1
  WorkerCoords coords_;
  std::unique_ptr<PsClient> ps_;
  int64_t start_step_ = 0;

  std::unique_ptr<GptModel> model_;  // pp = tp = 1
  std::unique_ptr<StageModel> stage_model_;  // pp * tp > 1
  std::unique_ptr<PeerNetwork> peers_;
  std::unique_ptr<RingAllReduce> ring_;
  std::unique_ptr<ProgressExport> progress_export_;  // from BuildTrainer
  // Declared after what it uses, so destroyed first.
  std::unique_ptr<TrainingLoop> loop_;
  // loop_ when this worker holds the whole model (pp = tp = 1): it samples.
  DataParallelTrainer* whole_model_trainer_ = nullptr;

  // Shared with the trainer's progress callback and the heartbeat thread.
  absl::Mutex mu_;
  TrainerProgress latest_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_for_resize_ ABSL_GUARDED_BY(mu_) = false;
  std::string error_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> peers_lost_{false};
  std::atomic<bool> reassembled_{false};
  std::atomic<bool> failure_logged_{false};
  // Set once the training loop exists (Train): OnHeartbeat acts from then.
  std::atomic<bool> training_{false};
  std::unique_ptr<HeartbeatLoop> heartbeat_;  // destroyed first
};

}  // namespace

absl::Status RunWorkerDaemon(const WorkerDaemonOptions& options,
                             StopSignal* stop) {
  if (options.scheduler.empty()) {
    return absl::InvalidArgumentError("--scheduler=host:port is required");
  }
  if (!options.backend_factory) {
    return absl::InvalidArgumentError(
        "WorkerDaemonOptions.backend_factory is "
        "required");
  }
  while (true) {
    if (stop->stopped()) return Stopped();
    WorkerSession session(options, stop);
    LMPS_ASSIGN_OR_RETURN(const SessionEnd end, session.Run());
    if (end == SessionEnd::kFinished) return absl::OkStatus();
  }
}

}  // namespace lmps
