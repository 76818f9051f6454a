#include "common/rpc/rpc_interceptor.h"

#include <string>

#include <google/protobuf/message_lite.h>
#include <grpcpp/support/byte_buffer.h>

#include "absl/time/clock.h"

namespace lmps {
namespace {

using grpc::experimental::InterceptionHookPoints;
using grpc::experimental::InterceptorBatchMethods;

std::string MethodName(const char* method) {
  std::string m = method == nullptr ? "unknown" : method;
  if (!m.empty() && m[0] == '/') m.erase(0, 1);
  return m;
}

// The lmps methods whose messages are raw grpc::ByteBuffers rather than
// protobuf objects (common/wire/chunk_wire.h: the parameter server and the
// worker's PsClient pull and push raw, the workers send to peers raw).
bool IsRaw(const std::string& method) {
  return method == "lmps.ParameterServer/Pull" ||
         method == "lmps.ParameterServer/Push" ||
         method == "lmps.WorkerPeer/Send";
}

class MetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(RpcMetrics* metrics, std::string method)
      : metrics_(metrics),
        method_(std::move(method)),
        // Only lmps services are known to carry protobuf messages or the
        // raw buffers above; others (the health service) pass raw
        // ByteBuffers of their own, so they are counted but their bytes
        // are not.
        count_bytes_(method_.rfind("lmps.", 0) == 0),
        raw_(IsRaw(method_)),
        start_(absl::Now()) {}

  ~MetricsInterceptor() override {
    metrics_->Record(method_, code_, received_, sent_, absl::Now() - start_);
  }

  void Intercept(InterceptorBatchMethods* methods) override {
    if (count_bytes_ && methods->QueryInterceptionHookPoint(
                            InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      if (const void* msg = methods->GetSendMessage()) {
        sent_ += Size(msg);
      } else if (const grpc::ByteBuffer* b =
                     methods->GetSerializedSendMessage()) {
        sent_ += static_cast<int64_t>(b->Length());  // already serialized
      }
    }
    if (count_bytes_ && methods->QueryInterceptionHookPoint(
                            InterceptionHookPoints::POST_RECV_MESSAGE)) {
      received_ += Size(methods->GetRecvMessage());
    }
    if (methods->QueryInterceptionHookPoint(
            InterceptionHookPoints::PRE_SEND_STATUS)) {
      code_ = static_cast<absl::StatusCode>(methods->GetSendStatus().error_code());
    }
    if (methods->QueryInterceptionHookPoint(
            InterceptionHookPoints::POST_RECV_STATUS)) {
      if (grpc::Status* s = methods->GetRecvStatus()) {
        code_ = static_cast<absl::StatusCode>(s->error_code());
      }
    }
    methods->Proceed();
  }

 private:
  int64_t Size(const void* message) const {
    if (message == nullptr) return 0;
    if (raw_) {
      return static_cast<int64_t>(
          static_cast<const grpc::ByteBuffer*>(message)->Length());
    }
    return static_cast<int64_t>(
        static_cast<const google::protobuf::MessageLite*>(message)
            ->ByteSizeLong());
  }

  RpcMetrics* const metrics_;
  const std::string method_;
  const bool count_bytes_;
  const bool raw_;
  const absl::Time start_;
  absl::StatusCode code_ = absl::StatusCode::kOk;
  int64_t received_ = 0, sent_ = 0;
};

class ServerFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit ServerFactory(RpcMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(metrics_, MethodName(info->method()));
  }

 private:
  RpcMetrics* const metrics_;
};

class ClientFactory
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit ClientFactory(RpcMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new MetricsInterceptor(metrics_, MethodName(info->method()));
  }

 private:
  RpcMetrics* const metrics_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeServerMetricsInterceptor(RpcMetrics* metrics) {
  return std::make_unique<ServerFactory>(metrics);
}

std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeClientMetricsInterceptor(RpcMetrics* metrics) {
  return std::make_unique<ClientFactory>(metrics);
}

}  // namespace lmps
