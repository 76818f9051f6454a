"""cuda_library: CUDA sources compiled by nvcc into a static archive.

Bazel 4.2.3 has no CUDA rules, so each .cu file is compiled by a genrule
running the nvcc that `@sys` found (bazel/system_libs.bzl), the objects are
archived with `ar`, and a cc_library wraps the archive together with the
CUDA runtime, cuBLAS and cuBLASLt (`@sys//:cudart`). Call it only where
`HAVE_CUDA` (from `@sys//:cuda.bzl`) is true: without nvcc `@sys` defines
neither `bin/nvcc` nor `cudart`.

Device code is built for sm_90 (H100/H200 SASS) plus compute_80 PTX, which
the driver JIT-compiles for any other GPU of compute capability >= 8.0. The
host side is compiled by /usr/bin/g++ with -std=c++17 -O3 -fPIC; headers are
found from the execution root (`#include "worker/backend/backend.h"`), the
generated-files root and the system (/usr/include: Abseil).

Example:
    load("@sys//:cuda.bzl", "HAVE_CUDA")
    load("//bazel:cuda.bzl", "cuda_library")

    cuda_library(
        name = "kernels",
        srcs = ["kernels.cu", "private.cuh"],
        hdrs = ["kernels.h"],
        deps = ["//worker/backend"],
    ) if HAVE_CUDA else None
"""

# Flags of every nvcc invocation (besides -c/-o and the include paths).
NVCC_FLAGS = [
    "-ccbin /usr/bin/g++",
    "-std=c++17",
    "-O3",
    "-Xcompiler -fPIC",
    "-DNDEBUG",
    "-lineinfo",
    "-gencode arch=compute_90,code=sm_90",
    "-gencode arch=compute_80,code=compute_80",
]

def _cc_headers_impl(ctx):
    headers = [
        dep[CcInfo].compilation_context.headers
        for dep in ctx.attr.deps
        if CcInfo in dep
    ]
    return [DefaultInfo(files = depset(transitive = headers))]

# The transitive headers of some cc_library targets, as plain files, so that
# a genrule can list them as inputs (the sandbox only contains declared
# inputs).
_cc_headers = rule(
    implementation = _cc_headers_impl,
    attrs = {"deps": attr.label_list()},
)

def cuda_library(
        name,
        srcs,
        hdrs = [],
        deps = [],
        nvcc_flags = [],
        defines = [],
        visibility = None,
        testonly = False):
    """A cc_library from CUDA sources.

    Args:
      name: name of the cc_library (also the prefix of the helper targets).
      srcs: .cu files (compiled one nvcc action each, in parallel) and
        private headers they include (.h, .cuh).
      hdrs: public headers, usable by g++ code when they need no CUDA
        compiler (they may include the CUDA runtime's headers).
      deps: cc_library targets whose headers the sources include and whose
        code they call; `@sys//:cudart` is added, do not list it.
      nvcc_flags: extra nvcc flags.
      defines: as cc_library.defines (propagate to dependents).
      visibility: of the cc_library.
      testonly: of all the targets.
    """
    headers = name + "_nvcc_headers"
    _cc_headers(
        name = headers,
        deps = deps,
        testonly = testonly,
        visibility = ["//visibility:private"],
    )
    cu_srcs = [s for s in srcs if s.endswith(".cu")]
    private_hdrs = [s for s in srcs if not s.endswith(".cu")]
    if not cu_srcs:
        fail("cuda_library %s: no .cu file in srcs" % name)

    flags = " ".join(
        NVCC_FLAGS + nvcc_flags + ["-D" + d for d in defines] +
        ["-I.", "-I$(GENDIR)", "-I$(BINDIR)"],
    )
    objs = []
    for src in cu_srcs:
        stem = src[:-len(".cu")]
        obj = "_nvcc/%s/%s.o" % (name, stem)
        native.genrule(
            name = "%s_nvcc_%s" % (name, stem.replace("/", "_")),
            srcs = [src] + hdrs + private_hdrs + [":" + headers],
            outs = [obj],
            tools = ["@sys//:bin/nvcc"],
            # nvcc finds its own tools relative to its real location.
            cmd = "$$(readlink -f $(location @sys//:bin/nvcc)) %s -c $(location %s) -o $@" % (flags, src),
            message = "nvcc %s" % src,
            testonly = testonly,
            visibility = ["//visibility:private"],
        )
        objs.append(obj)

    archive = "_nvcc/%s/lib%s_cuda.a" % (name, name)
    native.genrule(
        name = name + "_nvcc_archive",
        srcs = objs,
        outs = [archive],
        cmd = "rm -f $@ && ar rcsD $@ $(SRCS)",
        message = "ar %s" % archive,
        testonly = testonly,
        visibility = ["//visibility:private"],
    )
    native.cc_library(
        name = name,
        srcs = [archive],
        hdrs = hdrs,
        deps = deps + ["@sys//:cudart"],
        defines = defines,
        linkstatic = True,
        testonly = testonly,
        visibility = visibility,
    )
