"""Repository rule exposing Debian's system libraries and tools to Bazel.

Runs `pkg-config` for each module at fetch time and writes a cc_library per
library with the right link options, so the build needs no download. It also
exposes protoc and grpc_cpp_plugin as files Bazel hashes, and detects nvcc
(CUDA_PATH, CUDA_HOME, /usr/local/cuda) into `HAVE_CUDA` in `cuda.bzl`.
"""

# name -> list of pkg-config modules.
_LIBS = {
    "grpc": ["grpc++", "protobuf"],
    "protobuf": ["protobuf"],
    "gtest": ["gtest", "gmock"],
    "gtest_main": ["gtest_main"],
    "openblas": ["openblas"],
    "absl": [
        "absl_status",
        "absl_statusor",
        "absl_strings",
        "absl_str_format",
        "absl_synchronization",
        "absl_time",
        "absl_flags",
        "absl_flags_parse",
        "absl_hash",
        "absl_random_random",
        "absl_raw_hash_set",
    ],
    "prometheus": ["prometheus-cpp-pull", "prometheus-cpp-core"],
    "re2": ["re2"],
}

def _pkg_config(ctx, modules):
    res = ctx.execute(["pkg-config", "--libs"] + modules)
    if res.return_code != 0:
        fail("pkg-config failed for %s: %s\nRun scripts/install_deps.sh first." % (modules, res.stderr))
    return [f for f in res.stdout.strip().split(" ") if f]

def _find_nvcc(ctx):
    for var in ["CUDA_PATH", "CUDA_HOME"]:
        root = ctx.os.environ.get(var, "")
        if root and ctx.path(root + "/bin/nvcc").exists:
            return root
    if ctx.path("/usr/local/cuda/bin/nvcc").exists:
        return "/usr/local/cuda"
    return ""

def _system_libs_impl(ctx):
    build = ['package(default_visibility = ["//visibility:public"])\n']
    for name, modules in _LIBS.items():
        opts = _pkg_config(ctx, modules)
        if name == "grpc":
            # Debian ships no .pc for the reflection library.
            opts = ["-Wl,--push-state,--no-as-needed", "-lgrpc++_reflection", "-Wl,--pop-state"] + opts
        build.append("cc_library(\n    name = %r,\n    linkopts = %r,\n)\n" % (name, opts + ["-lpthread"]))

    # civetweb (libcivetweb-dev, a dependency of prometheus-cpp-dev) has no
    # .pc file.
    if not ctx.path("/usr/include/CivetServer.h").exists:
        fail("civetweb not found: run scripts/install_deps.sh")
    build.append("cc_library(\n    name = \"civetweb\",\n    linkopts = [\"-lcivetweb-cpp\", \"-lcivetweb\", \"-lpthread\"],\n)\n")

    for tool in ["protoc", "grpc_cpp_plugin"]:
        path = ctx.which(tool)
        if path == None:
            fail("%s not found: run scripts/install_deps.sh" % tool)
        ctx.symlink(path, "bin/" + tool)
    build.append('exports_files(["bin/protoc", "bin/grpc_cpp_plugin"])\n')

    # Protobuf's well-known .proto files, for imports.
    ctx.symlink("/usr/include/google/protobuf", "wkt/google/protobuf")
    build.append('filegroup(name = "wkt_protos", srcs = glob(["wkt/google/protobuf/*.proto"]))\n')

    cuda = _find_nvcc(ctx)
    if cuda:
        ctx.symlink(cuda + "/include", "cuda_include")
        ctx.symlink(cuda + "/bin/nvcc", "bin/nvcc")
        build.append("""cc_library(
    name = "cuda_headers",
    hdrs = glob(["cuda_include/**/*.h", "cuda_include/**/*.hpp"]),
    includes = ["cuda_include"],
)
cc_library(
    name = "cudart",
    linkopts = ["-L{root}/lib64", "-Wl,-rpath,{root}/lib64", "-lcublasLt", "-lcublas", "-lcudart", "-ldl", "-lrt"],
    deps = [":cuda_headers"],
)
exports_files(["bin/nvcc"])
""".format(root = cuda))
    ctx.file("cuda.bzl", "HAVE_CUDA = %s\nCUDA_ROOT = %r\n" % ("True" if cuda else "False", cuda))
    ctx.file("BUILD.bazel", "\n".join(build))
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)

system_libs = repository_rule(
    implementation = _system_libs_impl,
    environ = ["CUDA_PATH", "CUDA_HOME", "PATH"],
    local = True,
)
