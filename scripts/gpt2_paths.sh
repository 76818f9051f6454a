# Sourced by scripts/install_deps.sh and deploy/build_images.sh: where
# GPT-2's vocabulary lives, read from the one place that names it
# (common/text/gpt2_bpe.h's kGpt2InstallDir and kGpt2PackageSubdir).
# Sets gpt2_dir (the npm prefix) and gpt2_pkg (the folder with
# encoder.json, vocab.bpe and Encoder.js); returns 1, saying why, when the
# header cannot be read.
gpt2_header="$(dirname "${BASH_SOURCE[0]}")/../common/text/gpt2_bpe.h"
gpt2_dir="$(sed -n 's/^inline constexpr char kGpt2InstallDir\[\] = "\(.*\)";$/\1/p' "$gpt2_header")"
gpt2_sub="$(sed -n 's/^inline constexpr char kGpt2PackageSubdir\[\] = "\(.*\)";$/\1/p' "$gpt2_header")"
if [ -z "$gpt2_dir" ] || [ -z "$gpt2_sub" ]; then
  echo "cannot read kGpt2InstallDir/kGpt2PackageSubdir from $gpt2_header" >&2
  return 1
fi
gpt2_pkg="$gpt2_dir/$gpt2_sub"
