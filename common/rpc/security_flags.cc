#include "common/rpc/security_flags.h"

#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA certificate: servers verify client certificates against it, "
          "clients verify servers' (empty: plaintext unless --tls_cert)");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate of this process (served, and presented as client "
          "certificate); with --tls_key");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(bool, tls_require_client_cert, true,
          "with --tls_ca, servers refuse clients without a certificate signed "
          "by it (false: verify only presented certificates)");
ABSL_FLAG(std::string, tls_server_name, "",
          "name expected in servers' certificates instead of the host being "
          "dialled (empty: the host)");
ABSL_FLAG(std::string, auth_token_file, "",
          "file holding the job's shared token: sent as 'authorization: "
          "Bearer <token>' on every call, and required on every call served "
          "except gRPC health (empty: no token)");

namespace lmps {

SecurityOptions SecurityOptionsFromFlags() {
  SecurityOptions options;
  options.ca_cert = absl::GetFlag(FLAGS_tls_ca);
  options.cert = absl::GetFlag(FLAGS_tls_cert);
  options.key = absl::GetFlag(FLAGS_tls_key);
  options.require_client_cert = absl::GetFlag(FLAGS_tls_require_client_cert);
  options.server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.token_file = absl::GetFlag(FLAGS_auth_token_file);
  return options;
}

}  // namespace lmps
