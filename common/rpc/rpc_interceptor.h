// gRPC interceptors that record every RPC of a daemon in RpcMetrics
// (lmps_rpc_total{method,code}, lmps_rpc_received_bytes_total,
// lmps_rpc_sent_bytes_total, lmps_rpc_duration_seconds), on the server side
// and the client side, so no service or client code has to count by hand.
// `method` is the full gRPC method without the leading slash, e.g.
// "lmps.ParameterServer/Push". Bytes are serialized message sizes.
//
// Thread-safety: the factories are thread-safe; RpcMetrics must outlive
// every server and channel they are installed on.
#ifndef LMPS_COMMON_RPC_RPC_INTERCEPTOR_H_
#define LMPS_COMMON_RPC_RPC_INTERCEPTOR_H_

#include <memory>
#include <vector>

#include <grpcpp/support/client_interceptor.h>
#include <grpcpp/support/server_interceptor.h>

#include "common/rpc/metrics.h"

namespace lmps {

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeServerMetricsInterceptor(RpcMetrics* metrics);

std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeClientMetricsInterceptor(RpcMetrics* metrics);

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_RPC_INTERCEPTOR_H_
