#include "common/rpc/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc_interceptor.h"

namespace lmps {

absl::StatusOr<StartedServer> StartGrpcServer(
    const GrpcServerOptions& options,
    const std::vector<grpc::Service*>& services) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  std::shared_ptr<grpc::AuthMetadataProcessor> processor;
  if (options.security.has_token()) {
    TokenAuthProcessor::Options po;
    po.token = options.security.token();
    po.metrics = options.metrics;
    po.log = options.log;
    processor = std::make_shared<TokenAuthProcessor>(std::move(po));
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeServerCredentials(options.security, std::move(processor));
  if (!credentials.ok()) return credentials.status();
  grpc::ServerBuilder builder;
  StartedServer started;
  builder.AddListeningPort(options.listen_address, *credentials,
                           &started.port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  // Accept the keepalive pings of ClientChannelArgs (every 10 s, also
  // without calls) during long waits.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(
      GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
      static_cast<int>(absl::ToInt64Milliseconds(
          options.min_client_ping_interval)));
  for (grpc::Service* service : services) builder.RegisterService(service);
  if (options.rpc_metrics != nullptr) {
    std::vector<std::unique_ptr<
        grpc::experimental::ServerInterceptorFactoryInterface>>
        interceptors;
    interceptors.push_back(MakeServerMetricsInterceptor(options.rpc_metrics));
    builder.experimental().SetInterceptorCreators(std::move(interceptors));
  }
  started.server = builder.BuildAndStart();
  if (started.server == nullptr || started.port == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", options.listen_address,
        options.security.tls()
            ? " (address in use or invalid, or the TLS certificate and key "
              "were refused: see gRPC's log above)"
            : " (address in use or invalid)"));
  }
  SetServing(started.server.get(), false);
  return started;
}

void SetServing(grpc::Server* server, bool serving) {
  if (auto* health = server->GetHealthCheckService()) {
    health->SetServingStatus(serving);
  }
}

grpc::ChannelArguments ClientChannelArgs(int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return args;
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           RpcMetrics* rpc_metrics,
                                           const Security& security) {
  grpc::ChannelArguments args = ClientChannelArgs();
  if (!security.server_name().empty()) {
    args.SetSslTargetNameOverride(security.server_name());
  }
  std::vector<std::unique_ptr<
      grpc::experimental::ClientInterceptorFactoryInterface>>
      interceptors;
  if (rpc_metrics != nullptr) {
    interceptors.push_back(MakeClientMetricsInterceptor(rpc_metrics));
  }
  if (security.has_token()) {
    interceptors.push_back(MakeTokenInterceptorFactory(security.token()));
  }
  if (interceptors.empty()) {
    return grpc::CreateCustomChannel(address, MakeChannelCredentials(security),
                                     args);
  }
  return grpc::experimental::CreateCustomChannelWithInterceptors(
      address, MakeChannelCredentials(security), args,
      std::move(interceptors));
}

}  // namespace lmps
