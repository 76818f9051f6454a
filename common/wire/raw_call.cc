#include "common/wire/raw_call.h"

#include <grpcpp/support/client_callback.h>

#include <utility>

#include "absl/synchronization/mutex.h"
#include "common/rpc/status_util.h"

namespace lmps {
namespace {

// The reactor of both call shapes: the caller's thread drives it (starts
// reads and writes, waits for their completion under mu_). A hold keeps
// OnDone from running while the caller may still start operations.
class Reactor final
    : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  void OnReadDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    reading_ = false;
    if (ok) {
      read_ready_ = true;
    } else {
      read_end_ = true;
    }
  }
  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) write_failed_ = true;
  }
  void OnDone(const grpc::Status& status) override {
    absl::MutexLock lock(&mu_);
    done_ = true;
    status_ = status;
  }

  // Starts reading into `buffer` (not while a read is outstanding).
  void Read(grpc::ByteBuffer* buffer) {
    {
      absl::MutexLock lock(&mu_);
      reading_ = true;
      read_ready_ = false;
    }
    StartRead(buffer);
  }
  // Waits for the outstanding read: true if a message arrived, false at the
  // end of the stream (or a broken call).
  bool AwaitRead() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](Reactor* r) { return !r->reading_; }, this));
    return read_ready_;
  }
  void Write(const grpc::ByteBuffer* buffer) {
    {
      absl::MutexLock lock(&mu_);
      writing_ = true;
    }
    StartWrite(buffer);
  }
  // Waits for the outstanding write (if any): false if it failed.
  bool AwaitWrite() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](Reactor* r) { return !r->writing_; }, this));
    return !write_failed_;
  }
  // Releases the hold and waits for the call's end.
  grpc::Status Finish() {
    RemoveHold();
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
    return status_;
  }

 private:
  absl::Mutex mu_;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool read_ready_ ABSL_GUARDED_BY(mu_) = false;
  bool read_end_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool write_failed_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::Status ServerStreamingCall(
    grpc::GenericStub* stub, const std::string& method,
    grpc::ClientContext* context, const grpc::ByteBuffer& request,
    const std::function<absl::Status(const grpc::ByteBuffer&)>& on_message) {
  Reactor reactor;
  stub->PrepareBidiStreamingCall(context, method, grpc::StubOptions(),
                                 &reactor);
  reactor.AddHold();
  reactor.StartWriteLast(&request, grpc::WriteOptions());
  grpc::ByteBuffer buffers[2];
  int next = 0;
  reactor.Read(&buffers[next]);
  reactor.StartCall();
  absl::Status failed;
  while (reactor.AwaitRead()) {
    const grpc::ByteBuffer& message = buffers[next];
    next ^= 1;
    reactor.Read(&buffers[next]);  // the next one arrives meanwhile
    if (!failed.ok()) continue;    // draining after a cancel
    failed = on_message(message);
    if (!failed.ok()) context->TryCancel();
  }
  const grpc::Status status = reactor.Finish();
  if (!failed.ok()) return failed;
  return FromGrpcStatus(status);
}

absl::Status ClientStreamingCall(
    grpc::GenericStub* stub, const std::string& method,
    grpc::ClientContext* context,
    const std::function<absl::StatusOr<bool>(grpc::ByteBuffer*)>& next,
    grpc::ByteBuffer* response) {
  Reactor reactor;
  stub->PrepareBidiStreamingCall(context, method, grpc::StubOptions(),
                                 &reactor);
  reactor.AddHold();
  reactor.Read(response);
  reactor.StartCall();
  grpc::ByteBuffer buffers[2];
  int k = 0;
  absl::Status failed;
  bool writing = false;
  while (true) {
    absl::StatusOr<bool> more = next(&buffers[k]);
    // The write before this one must be done before the next starts (and
    // before its buffer is reused by the build after it).
    if (writing && !reactor.AwaitWrite()) break;  // the call broke
    writing = false;
    if (!more.ok()) {
      failed = more.status();
      context->TryCancel();
      break;
    }
    if (!*more) {
      reactor.StartWritesDone();
      break;
    }
    reactor.Write(&buffers[k]);
    writing = true;
    k ^= 1;
  }
  if (writing) reactor.AwaitWrite();
  reactor.AwaitRead();
  const grpc::Status status = reactor.Finish();
  if (!failed.ok()) return failed;
  return FromGrpcStatus(status);
}

}  // namespace lmps
