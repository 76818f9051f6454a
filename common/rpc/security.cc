#include "common/rpc/security.h"

#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpcpp/security/server_credentials.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/rpc/metrics.h"

namespace lmps {
namespace {

constexpr size_t kMinTokenLength = 16;
constexpr char kMetricName[] = "lmps_unauthenticated_total";
constexpr char kMetricHelp[] =
    "RPCs rejected with UNAUTHENTICATED by the shared-token check, by reason "
    "(TLS handshakes refused for lack of a valid client certificate are not "
    "counted: gRPC does not report them).";

absl::StatusOr<std::string> ReadWholeFile(absl::string_view flag,
                                          absl::string_view what,
                                          const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot read the ", what, " (--", flag, "=", path,
        "): ", std::strerror(errno)));
  }
  std::stringstream s;
  s << in.rdbuf();
  if (in.bad()) {
    return absl::InvalidArgumentError(
        absl::StrCat("error reading the ", what, " (--", flag, "=", path, ")"));
  }
  return s.str();
}

// Reads a PEM file and checks that it holds a block of the expected kind.
absl::StatusOr<std::string> ReadPem(absl::string_view flag,
                                    absl::string_view what,
                                    const std::string& path,
                                    absl::string_view marker) {
  absl::StatusOr<std::string> pem = ReadWholeFile(flag, what, path);
  if (!pem.ok()) return pem.status();
  if (!absl::StrContains(*pem, "-----BEGIN ") ||
      !absl::StrContains(*pem, marker)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the ", what, " (--", flag, "=", path,
                     ") is not a PEM file with a ", marker, " block"));
  }
  return pem;
}

// The token: the file's contents without surrounding whitespace.
absl::StatusOr<std::string> ReadToken(const std::string& path) {
  absl::StatusOr<std::string> raw =
      ReadWholeFile("auth_token_file", "auth token file", path);
  if (!raw.ok()) return raw.status();
  const std::string token(absl::StripAsciiWhitespace(*raw));
  const std::string where = absl::StrCat("--auth_token_file=", path);
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, " is empty"));
  }
  for (char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": the token must be printable ASCII without spaces or "
                 "line breaks (e.g. `openssl rand -hex 32`)"));
    }
  }
  if (token.size() < kMinTokenLength) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": the token has ", token.size(),
                     " characters; use at least ", kMinTokenLength,
                     " (e.g. `openssl rand -hex 32`)"));
  }
  return token;
}

// A plaintext server port whose calls pass through an AuthMetadataProcessor.
// gRPC C++'s InsecureServerCredentials refuse a processor, but the core's
// insecure credentials run one like any other (the server auth filter is in
// every server channel whose port has credentials), so this wraps those.
class PlaintextWithProcessorCredentials final : public grpc::ServerCredentials {
 public:
  explicit PlaintextWithProcessorCredentials(
      std::shared_ptr<grpc::AuthMetadataProcessor> processor)
      : creds_(grpc_insecure_server_credentials_create()) {
    grpc_auth_metadata_processor p;
    p.process = &Process;
    p.destroy = &Destroy;
    p.state = new std::shared_ptr<grpc::AuthMetadataProcessor>(
        std::move(processor));
    grpc_server_credentials_set_auth_metadata_processor(creds_, p);
  }
  ~PlaintextWithProcessorCredentials() override {
    grpc_server_credentials_release(creds_);
  }

  void SetAuthMetadataProcessor(
      const std::shared_ptr<grpc::AuthMetadataProcessor>& processor) override {
    grpc_auth_metadata_processor p;
    p.process = &Process;
    p.destroy = &Destroy;
    p.state = new std::shared_ptr<grpc::AuthMetadataProcessor>(processor);
    grpc_server_credentials_set_auth_metadata_processor(creds_, p);
  }

 private:
  int AddPortToServer(const std::string& addr, grpc_server* server) override {
    return grpc_server_add_http2_port(server, addr.c_str(), creds_);
  }

  static void Destroy(void* state) {
    delete static_cast<std::shared_ptr<grpc::AuthMetadataProcessor>*>(state);
  }

  // Adapts the C callback to grpc::AuthMetadataProcessor (without an
  // AuthContext: plaintext peers have no identity). Runs synchronously.
  static void Process(void* state, grpc_auth_context* /*context*/,
                      const grpc_metadata* md, size_t num_md,
                      grpc_process_auth_metadata_done_cb cb, void* user_data) {
    auto& processor =
        *static_cast<std::shared_ptr<grpc::AuthMetadataProcessor>*>(state);
    grpc::AuthMetadataProcessor::InputMetadata input;
    for (size_t i = 0; i < num_md; ++i) {
      input.emplace(
          grpc::string_ref(
              reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(md[i].key)),
              GRPC_SLICE_LENGTH(md[i].key)),
          grpc::string_ref(
              reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(md[i].value)),
              GRPC_SLICE_LENGTH(md[i].value)));
    }
    grpc::AuthMetadataProcessor::OutputMetadata consumed, response;
    const grpc::Status status =
        processor->Process(input, nullptr, &consumed, &response);
    std::vector<grpc_metadata> consumed_md;
    for (const auto& [key, value] : consumed) {
      grpc_metadata m;
      std::memset(&m, 0, sizeof(m));
      m.key = grpc_slice_from_static_buffer(key.data(), key.size());
      m.value = grpc_slice_from_static_buffer(value.data(), value.size());
      consumed_md.push_back(m);
    }
    cb(user_data, consumed_md.data(), consumed_md.size(), nullptr, 0,
       static_cast<grpc_status_code>(status.error_code()),
       status.ok() ? nullptr : status.error_message().c_str());
  }

  grpc_server_credentials* const creds_;
};

// Adds the bearer token to every outgoing call.
class TokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit TokenInterceptor(const std::string* value) : value_(value) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::
                PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization", *value_);
    }
    methods->Proceed();
  }

 private:
  const std::string* const value_;  // owned by the factory
};

class TokenInterceptorFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit TokenInterceptorFactory(const std::string& token)
      : value_(absl::StrCat("Bearer ", token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new TokenInterceptor(&value_);
  }

 private:
  const std::string value_;
};

}  // namespace

bool TokenEquals(absl::string_view expected, absl::string_view given) {
  // Every byte of `expected` is looked at whatever `given` holds; only the
  // length of the secret can leak.
  unsigned char diff = expected.size() == given.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char g =
        i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= static_cast<unsigned char>(expected[i]) ^ g;
  }
  return diff == 0;
}

absl::StatusOr<Security> Security::Load(const SecurityOptions& options) {
  Security s;
  if (options.cert.empty() != options.key.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert and --tls_key go together: give both (this process's "
        "certificate and its private key) or neither");
  }
  s.tls_ = !options.ca_cert.empty() || !options.cert.empty();
  s.require_client_cert_ = options.require_client_cert;
  if (!options.ca_cert.empty()) {
    absl::StatusOr<std::string> ca =
        ReadPem("tls_ca", "CA certificate", options.ca_cert, "CERTIFICATE");
    if (!ca.ok()) return ca.status();
    s.ca_pem_ = *std::move(ca);
  }
  if (!options.cert.empty()) {
    absl::StatusOr<std::string> cert =
        ReadPem("tls_cert", "certificate", options.cert, "CERTIFICATE");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key =
        ReadPem("tls_key", "private key", options.key, "PRIVATE KEY");
    if (!key.ok()) return key.status();
    s.cert_pem_ = *std::move(cert);
    s.key_pem_ = *std::move(key);
  }
  if (!options.server_name.empty() && !s.tls_) {
    return absl::InvalidArgumentError(
        "--tls_server_name needs TLS (--tls_ca, and --tls_cert/--tls_key)");
  }
  s.server_name_ = options.server_name;
  if (!options.token_file.empty()) {
    absl::StatusOr<std::string> token = ReadToken(options.token_file);
    if (!token.ok()) return token.status();
    s.token_ = *std::move(token);
  }
  return s;
}

std::string Security::Describe() const {
  std::string out;
  if (!tls_) {
    out = "plaintext";
  } else if (ca_pem_.empty()) {
    out = "TLS (system CA roots; client certificates not requested)";
  } else if (require_client_cert_) {
    out = "TLS with client certificates (mutual)";
  } else {
    out = "TLS (client certificates verified when presented, not required)";
  }
  if (has_token()) {
    absl::StrAppend(&out, " + token",
                    tls_ ? "" : " (the token travels unencrypted)");
  } else if (!tls_) {
    absl::StrAppend(&out, ", no authentication");
  }
  return out;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const Security& security,
    std::shared_ptr<grpc::AuthMetadataProcessor> processor) {
  if (!security.tls_) {
    if (processor == nullptr) return grpc::InsecureServerCredentials();
    return std::shared_ptr<grpc::ServerCredentials>(
        std::make_shared<PlaintextWithProcessorCredentials>(
            std::move(processor)));
  }
  if (!security.has_certificate()) {
    return absl::FailedPreconditionError(
        "serving TLS needs this server's certificate and key (--tls_cert, "
        "--tls_key); --tls_ca alone only configures clients");
  }
  grpc_ssl_client_certificate_request_type request =
      GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
  if (!security.ca_pem_.empty()) {
    request = security.require_client_cert_
                  ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                  : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  grpc::SslServerCredentialsOptions options(request);
  options.pem_root_certs = security.ca_pem_;
  options.pem_key_cert_pairs.push_back(
      {security.key_pem_, security.cert_pem_});
  std::shared_ptr<grpc::ServerCredentials> creds =
      grpc::SslServerCredentials(options);
  if (processor != nullptr) creds->SetAuthMetadataProcessor(processor);
  return creds;
}

std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(
    const Security& security) {
  if (!security.tls_) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = security.ca_pem_;
  options.pem_private_key = security.key_pem_;
  options.pem_cert_chain = security.cert_pem_;
  return grpc::SslCredentials(options);
}

std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeTokenInterceptorFactory(const std::string& token) {
  return std::make_unique<TokenInterceptorFactory>(token);
}

TokenAuthProcessor::TokenAuthProcessor(Options options)
    : options_(std::move(options)) {
  if (options_.metrics != nullptr) {
    // Both series exist from the start (at 0), so rate() works at once.
    if (auto c = options_.metrics->Counter(kMetricName, kMetricHelp,
                                           {{"reason", "missing_token"}});
        c.ok()) {
      missing_ = *c;
    }
    if (auto c = options_.metrics->Counter(kMetricName, kMetricHelp,
                                           {{"reason", "wrong_token"}});
        c.ok()) {
      wrong_ = *c;
    }
  }
}

grpc::Status TokenAuthProcessor::Process(
    const InputMetadata& auth_metadata, grpc::AuthContext* /*context*/,
    OutputMetadata* consumed_auth_metadata,
    OutputMetadata* /*response_metadata*/) {
  absl::string_view method;
  if (auto it = auth_metadata.find(":path"); it != auth_metadata.end()) {
    method = absl::string_view(it->second.data(), it->second.size());
  }
  const auto [begin, end] = auth_metadata.equal_range("authorization");
  if (begin != end) {
    // Never pass the secret on to handlers or interceptors.
    consumed_auth_metadata->emplace(
        "authorization", std::string(begin->second.data(), begin->second.size()));
  }
  if (absl::StartsWith(method, kHealthServicePrefix)) return grpc::Status::OK;
  if (begin == end) {
    Reject("missing_token", method);
    return grpc::Status(
        grpc::StatusCode::UNAUTHENTICATED,
        "this server requires the job's shared token: the call has no "
        "'authorization: Bearer <token>' metadata (give --auth_token_file)");
  }
  const absl::string_view value(begin->second.data(), begin->second.size());
  constexpr absl::string_view kScheme = "bearer ";
  const bool one = std::next(begin) == end;
  const bool bearer =
      value.size() > kScheme.size() &&
      absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme);
  if (!one || !bearer ||
      !TokenEquals(options_.token,
                   absl::StripLeadingAsciiWhitespace(value.substr(kScheme.size())))) {
    Reject("wrong_token", method);
    return grpc::Status(
        grpc::StatusCode::UNAUTHENTICATED,
        "wrong token: the 'authorization' metadata does not carry this job's "
        "shared token (compare the --auth_token_file of both sides)");
  }
  return grpc::Status::OK;
}

void TokenAuthProcessor::Reject(absl::string_view reason,
                                absl::string_view method) {
  prometheus::Counter* counter = reason == "missing_token" ? missing_ : wrong_;
  if (counter != nullptr) counter->Increment();
  std::string line;
  {
    absl::MutexLock lock(&mu_);
    ++rejected_;
    ++unlogged_;
    const absl::Time now = absl::Now();
    if (now - last_log_ < options_.log_interval) return;
    line = absl::StrCat("rejected ", unlogged_,
                        " call(s) with UNAUTHENTICATED (missing or wrong "
                        "token) since the last report; latest: ",
                        method.empty() ? "(no method)" : method, " (", reason,
                        ")");
    unlogged_ = 0;
    last_log_ = now;
  }
  if (options_.log) {
    options_.log(line);
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  }
}

int64_t TokenAuthProcessor::rejected() const {
  absl::MutexLock lock(&mu_);
  return rejected_;
}

}  // namespace lmps
