// Test helper: every parameter-server shard of a job (ParameterShard behind
// ParameterServerService) in this process, each behind its own gRPC server
// on 127.0.0.1, and PsClients talking to them.
//
// Thread-safety: Start and the destructor on one thread; Client and map()
// from any thread after Start.
#ifndef LMPS_TESTS_TESTING_PS_CLUSTER_H_
#define LMPS_TESTS_TESTING_PS_CLUSTER_H_

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/model/partition.h"
#include "common/rpc/grpc_server.h"
#include "proto/lmps.pb.h"
#include "server/service.h"
#include "server/shard.h"
#include "worker/ps_client.h"

namespace lmps::testing {

// Every shard of a job behind its own gRPC server.
class Cluster {
 public:
  // ServiceOptions::shared_memory of the shards Start makes.
  bool shared_memory = true;

  // Starts spec.layout.num_shards shards (spec with defaults applied), no
  // checkpoints.
  absl::Status Start(const JobSpec& spec) {
    spec_ = spec;
    const int n = spec.layout().num_shards();
    absl::StatusOr<PartitionMap> map =
        ComputePartition(spec.model(), n, spec.max_chunk_bytes());
    if (!map.ok()) return map.status();
    map_ = *map;
    for (int s = 0; s < n; ++s) {
      ShardOptions o;
      o.shard = s;
      o.spec = spec;
      o.map = map_;
      o.wait_timeout = absl::Seconds(10);
      absl::StatusOr<std::unique_ptr<ParameterShard>> shard =
          ParameterShard::Create(o);
      if (!shard.ok()) return shard.status();
      shards_.push_back(std::move(*shard));
      ServiceOptions so;
      so.wait_threads = 4;
      so.work_threads = 1;
      so.shared_memory = shared_memory;
      services_.push_back(std::make_unique<ParameterServerService>(so));
      GrpcServerOptions go;
      go.listen_address = "127.0.0.1:0";
      absl::StatusOr<StartedServer> started =
          StartGrpcServer(go, {services_.back().get()});
      if (!started.ok()) return started.status();
      services_.back()->SetShard(shards_.back().get());
      SetServing(started->server.get(), true);
      servers_.push_back(std::move(started->server));
      addresses_.push_back(absl::StrCat("127.0.0.1:", started->port));
    }
    return absl::OkStatus();
  }

  ~Cluster() {
    for (auto& shard : shards_) shard->Shutdown();
    for (auto& server : servers_) {
      server->Shutdown(std::chrono::system_clock::now());
    }
    servers_.clear();
    services_.clear();
    shards_.clear();
  }

  // A client of every shard; `options` with the spec's max_message_bytes
  // and a 20 s RPC timeout.
  absl::StatusOr<std::unique_ptr<PsClient>> Client(
      const PsClientView& view = {}, PsClientOptions options = {}) {
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (const std::string& a : addresses_) channels.push_back(MakeChannel(a));
    PsClientOptions o = std::move(options);
    o.max_message_bytes = spec_.max_message_bytes();
    o.rpc_timeout = absl::Seconds(20);
    return PsClient::Create(spec_.model(), map_, std::move(channels), addresses_,
                            o, view);
  }

  const PartitionMap& map() const { return map_; }
  // The shards' addresses, by shard.
  const std::vector<std::string>& addresses() const { return addresses_; }

 private:
  JobSpec spec_;
  PartitionMap map_;
  std::vector<std::unique_ptr<ParameterShard>> shards_;
  std::vector<std::unique_ptr<ParameterServerService>> services_;
  std::vector<std::unique_ptr<grpc::Server>> servers_;
  std::vector<std::string> addresses_;
};

}  // namespace lmps::testing

#endif  // LMPS_TESTS_TESTING_PS_CLUSTER_H_
