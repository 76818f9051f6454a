"""cc_grpc_library: C++ protobuf + gRPC code from a .proto via the system protoc."""

def cc_grpc_library(name, src, deps = [], visibility = None):
    """Generates <base>.pb.{h,cc} and <base>.grpc.pb.{h,cc} and a cc_library.

    Headers are included as "proto/<base>.pb.h" from the workspace root.
    """
    base = src[:-len(".proto")]
    outs = [base + ".pb.h", base + ".pb.cc", base + ".grpc.pb.h", base + ".grpc.pb.cc"]
    native.genrule(
        name = name + "_gen",
        srcs = [src],
        outs = outs,
        tools = ["@sys//:bin/protoc", "@sys//:bin/grpc_cpp_plugin"],
        cmd = " ".join([
            "$(location @sys//:bin/protoc)",
            "--proto_path=.",
            "--plugin=protoc-gen-grpc=$(location @sys//:bin/grpc_cpp_plugin)",
            "--cpp_out=$(GENDIR)",
            "--grpc_out=$(GENDIR)",
            "$(location %s)" % src,
        ]),
    )
    native.cc_library(
        name = name,
        srcs = [base + ".pb.cc", base + ".grpc.pb.cc"],
        hdrs = [base + ".pb.h", base + ".grpc.pb.h"],
        deps = deps + ["@sys//:grpc"],
        visibility = visibility,
    )
