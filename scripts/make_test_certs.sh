#!/usr/bin/env bash
# Makes the TLS material of an lmps job for tests and trials: a private CA, a
# node certificate, a client certificate and a random shared token.
#
#   scripts/make_test_certs.sh DIR [NAME ...]
#
# Writes into DIR (created if missing; existing files are replaced):
#   ca.crt, ca.key          the CA (EC P-256, self-signed). Keep ca.key off
#                           the nodes: only ca.crt is needed at run time.
#   server.crt, server.key  for daemons that serve (scheduler, parameter
#                           servers). SubjectAltName: localhost, 127.0.0.1,
#                           ::1 and every NAME (DNS names or IP addresses,
#                           e.g. lmps-scheduler, 10.0.0.7). Extended key
#                           usage serverAuth AND clientAuth, since parameter
#                           servers are also clients of the scheduler.
#   client.crt, client.key  for pure clients (workers, lmps_local's status
#                           channel, grpcurl): clientAuth only.
#   token                   32 random bytes, hex: the --auth_token_file.
# Private keys and the token are mode 0600.
#
# Use with every daemon:
#   --tls_ca=DIR/ca.crt --tls_cert=DIR/server.crt --tls_key=DIR/server.key
#   --auth_token_file=DIR/token
# or with the launcher: lmps_local --tls_dir=DIR --auth_token_file=DIR/token.
#
# Certificates are valid for ${LMPS_CERT_DAYS:-365} days. Needs openssl(1).
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  [ $# -ge 1 ] && exit 0
  exit 2
fi
dir="$1"
shift
days="${LMPS_CERT_DAYS:-365}"
command -v openssl >/dev/null || {
  echo "make_test_certs: openssl not found (apt-get install openssl)" >&2
  exit 1
}
mkdir -p "$dir"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# SubjectAltName entries: DNS names and IP addresses (v4 or v6).
san="DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"
for name in "$@"; do
  if [[ "$name" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || [[ "$name" == *:* ]]; then
    san="$san,IP:$name"
  elif [[ "$name" =~ ^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$ ]]; then
    san="$san,DNS:$name"
  else
    echo "make_test_certs: '$name' is neither a DNS name nor an IP address" >&2
    exit 2
  fi
done

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# The CA.
newkey "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" \
  -subj "/O=lmps/CN=lmps test CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$dir/ca.crt"

# sign NAME CN EXTFILE: a key and a certificate signed by the CA.
sign() {
  local name="$1" cn="$2" ext="$3"
  newkey "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "/O=lmps/CN=$cn" -out "$tmp/$name.csr"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days" \
    -extfile "$ext" -out "$dir/$name.crt" 2>/dev/null
}

cat >"$tmp/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EOF
sign server "lmps node" "$tmp/server.ext"

cat >"$tmp/client.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=clientAuth
EOF
sign client "lmps client" "$tmp/client.ext"

openssl rand -hex 32 >"$dir/token"
chmod 0644 "$dir/ca.crt" "$dir/server.crt" "$dir/client.crt"
chmod 0600 "$dir/ca.key" "$dir/server.key" "$dir/client.key" "$dir/token"
openssl verify -CAfile "$dir/ca.crt" "$dir/server.crt" "$dir/client.crt" >/dev/null
echo "make_test_certs: wrote ca.crt, server.crt/.key ($san), client.crt/.key and token to $dir"
