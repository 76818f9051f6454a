"""clang_fuzzers: libFuzzer binaries built by the system clang++.

Bazel 4.2.3 builds lmps with the auto-configured gcc toolchain and cannot
switch compilers per target, so this rule runs /usr/bin/clang++ itself, with
-fsanitize=fuzzer,address,undefined, against Debian's gcc-built gRPC,
protobuf and Abseil (found with pkg-config; all share libstdc++, so C++ types
cross the boundary safely).

The C++ sources come from the `deps` cc_library targets and everything they
depend on in this workspace (an aspect collects their srcs and hdrs; system
libraries from @sys have none), so a new dependency of, say, //server:shard
needs no change here. Each source is one compile action (cached and run in
parallel like any Bazel action), the dependencies are archived into one
static library, and each fuzzer main in `srcs` is linked against it into an
executable named after the main (foo_fuzzer.cc -> foo_fuzzer).

Without clang++ or libFuzzer's runtime (Debian: clang, libclang-rt-14-dev)
the build still succeeds: a probe action records why, and every "fuzzer" is
then a shell script that prints `lmps-fuzz-skip: <reason>` and exits 0, so
fuzz/run_fuzzers.sh can report the skip clearly.
"""

_SourcesInfo = provider(
    doc = "C++ sources and headers of a cc_library and its workspace deps.",
    fields = {
        "srcs": "depset of .cc Files",
        "hdrs": "depset of header Files",
    },
)

_CC = ["cc", "cpp", "cxx", "c"]

def _collect_impl(target, ctx):
    srcs = []
    hdrs = []
    if ctx.rule.kind == "cc_library":
        for f in getattr(ctx.rule.files, "srcs", []):
            if f.owner.workspace_name:
                continue
            if f.extension in _CC:
                srcs.append(f)
            else:
                hdrs.append(f)
        for f in getattr(ctx.rule.files, "hdrs", []):
            if not f.owner.workspace_name:
                hdrs.append(f)
    deps = [d for d in getattr(ctx.rule.attr, "deps", []) if _SourcesInfo in d]
    return [_SourcesInfo(
        srcs = depset(srcs, transitive = [d[_SourcesInfo].srcs for d in deps]),
        hdrs = depset(hdrs, transitive = [d[_SourcesInfo].hdrs for d in deps]),
    )]

_collect = aspect(implementation = _collect_impl, attr_aspects = ["deps"])

# pkg-config modules for compiling and linking (as bazel/system_libs.bzl).
_PKG = " ".join([
    "grpc++",
    "protobuf",
    "absl_status",
    "absl_statusor",
    "absl_strings",
    "absl_str_format",
    "absl_synchronization",
    "absl_time",
    "absl_hash",
    "absl_random_random",
    "absl_raw_hash_set",
])

_SANITIZE = "-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined"

_COPTS = "-std=c++17 -O1 -g1 -fno-omit-frame-pointer " + _SANITIZE

_PROBE = """
out="$1"; log="$(dirname "$out")/probe.log"; exe="$(dirname "$out")/probe"
if ! command -v clang++ >/dev/null 2>&1; then
  echo "clang++ not found (Debian packages: clang libclang-rt-14-dev)" > "$out"
elif ! printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\\n' |
    clang++ -x c++ -fsanitize=fuzzer,address,undefined - -o "$exe" >"$log" 2>&1; then
  echo "clang++ cannot link -fsanitize=fuzzer,address,undefined (Debian package: libclang-rt-14-dev): $(head -c 300 "$log" | tr '\\n' ' ')" > "$out"
elif ! pkg-config --exists %s; then
  echo "pkg-config does not find %s" > "$out"
else
  echo ok > "$out"
fi
rm -f "$exe" "$log"
""" % (_PKG, _PKG)

def _object_path(ctx, src):
    return "_clang/%s/%s.o" % (ctx.label.name, src.short_path.replace("../", "external/"))

def _compile(ctx, src, probe, hdrs, includes):
    """One object file for `src`, compiled by clang++ (empty without it)."""
    obj = ctx.actions.declare_file(_object_path(ctx, src))
    ctx.actions.run_shell(
        outputs = [obj],
        inputs = depset([src, probe], transitive = [hdrs]),
        command = """
if [ "$(cat "$1")" != ok ]; then : > "$3"; exit 0; fi
exec clang++ %s -fsanitize=fuzzer-no-link %s $(pkg-config --cflags %s) -c "$2" -o "$3"
""" % (_COPTS, includes, _PKG),
        arguments = [probe.path, src.path, obj.path],
        use_default_shell_env = True,
        mnemonic = "ClangFuzzCompile",
        progress_message = "Compiling %s for fuzzing" % src.short_path,
    )
    return obj

def _clang_fuzzers_impl(ctx):
    probe = ctx.actions.declare_file("_clang/%s/probe.txt" % ctx.label.name)
    ctx.actions.run_shell(
        outputs = [probe],
        command = _PROBE,
        arguments = [probe.path],
        use_default_shell_env = True,
        mnemonic = "ClangFuzzProbe",
        progress_message = "Probing clang++ and libFuzzer",
    )

    infos = [d[_SourcesInfo] for d in ctx.attr.deps]
    dep_srcs = depset(transitive = [i.srcs for i in infos]).to_list()
    hdrs = depset(
        [f for f in ctx.files.srcs if f.extension not in _CC],
        transitive = [i.hdrs for i in infos],
    )
    includes = "-I. -I%s -I%s" % (ctx.bin_dir.path, ctx.genfiles_dir.path)

    dep_objs = [_compile(ctx, s, probe, hdrs, includes) for s in dep_srcs]
    archive = ctx.actions.declare_file("_clang/%s/libdeps.a" % ctx.label.name)
    ctx.actions.run_shell(
        outputs = [archive],
        inputs = dep_objs + [probe],
        command = """
probe="$1"; out="$2"; shift 2
rm -f "$out"
if [ "$(cat "$probe")" != ok ]; then : > "$out"; exit 0; fi
exec ar rcs "$out" "$@"
""",
        arguments = [probe.path, archive.path] + [o.path for o in dep_objs],
        use_default_shell_env = True,
        mnemonic = "ClangFuzzArchive",
        progress_message = "Archiving fuzzing dependencies",
    )

    binaries = []
    for main in [f for f in ctx.files.srcs if f.extension in _CC]:
        obj = _compile(ctx, main, probe, hdrs, includes)
        name = main.basename[:-len("." + main.extension)]
        exe = ctx.actions.declare_file(name)
        ctx.actions.run_shell(
            outputs = [exe],
            inputs = [obj, archive, probe],
            command = """
if [ "$(cat "$1")" != ok ]; then
  printf '#!/bin/sh\\necho "lmps-fuzz-skip: %%s"\\nexit 0\\n' "$(cat "$1")" > "$4"
  chmod +x "$4"; exit 0
fi
exec clang++ -fsanitize=fuzzer %s "$2" "$3" $(pkg-config --libs %s) -lpthread -o "$4"
""" % (_SANITIZE, _PKG),
            arguments = [probe.path, obj.path, archive.path, exe.path],
            use_default_shell_env = True,
            mnemonic = "ClangFuzzLink",
            progress_message = "Linking fuzzer %s" % name,
        )
        binaries.append(exe)

    return [DefaultInfo(
        files = depset(binaries),
        runfiles = ctx.runfiles(files = binaries + ctx.files.data),
    )]

clang_fuzzers = rule(
    implementation = _clang_fuzzers_impl,
    doc = "libFuzzer binaries (one per main in srcs) built with the system clang++.",
    attrs = {
        "srcs": attr.label_list(
            allow_files = [".cc", ".h"],
            doc = "Fuzzer mains (*.cc, each defines LLVMFuzzerTestOneInput) and their private headers.",
        ),
        "deps": attr.label_list(
            aspects = [_collect],
            doc = "cc_library targets whose code (and workspace dependencies) the fuzzers call.",
        ),
        "data": attr.label_list(allow_files = True, doc = "Corpora and dictionaries."),
    },
)
