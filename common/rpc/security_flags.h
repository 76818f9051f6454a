// The command-line flags of transport security, shared by lmps_scheduler,
// lmps_server and lmps_worker (and tools that talk to them):
//
//   --tls_ca=ca.crt --tls_cert=node.crt --tls_key=node.key
//   [--tls_require_client_cert=true] [--tls_server_name=NAME]
//   --auth_token_file=token
//
// See common/rpc/security.h for what each one enforces, and
// scripts/make_test_certs.sh for making the files. Only main() should call
// SecurityOptionsFromFlags; the result is passed down in options structs.
//
// Thread-safety: as absl::GetFlag.
#ifndef LMPS_COMMON_RPC_SECURITY_FLAGS_H_
#define LMPS_COMMON_RPC_SECURITY_FLAGS_H_

#include "common/rpc/security.h"

namespace lmps {

SecurityOptions SecurityOptionsFromFlags();

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_SECURITY_FLAGS_H_
