#include "worker/peer/mailbox.h"

#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

using ::testing::HasSubstr;

constexpr char kPeer[] = "worker-2 (dp 0, pp 1, tp 0) at 127.0.0.1:4567";

TransferKey Key(PeerKind kind = ACTIVATION, int64_t step = 3,
                int32_t micro_batch = 1, const std::string& sender = "w2") {
  TransferKey key;
  key.kind = kind;
  key.step = step;
  key.micro_batch = micro_batch;
  key.sender = sender;
  return key;
}

// Message of `key` carrying values [offset, offset + n) of the transfer
// whose element i is i + 0.5.
PeerMessage Msg(const TransferKey& key, int64_t total, int64_t offset,
                int64_t n) {
  PeerMessage m;
  m.set_kind(key.kind);
  m.set_eval(key.eval);
  m.set_step(key.step);
  m.set_micro_batch(key.micro_batch);
  m.set_seq(key.seq);
  m.set_round(key.round);
  m.set_sender(key.sender);
  m.set_total_elements(total);
  m.set_offset(offset);
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(offset + i) + 0.5f;
  m.set_data(reinterpret_cast<const char*>(v.data()), 4 * n);
  return m;
}

std::vector<float> Expected(int64_t total) {
  std::vector<float> v(total);
  for (int64_t i = 0; i < total; ++i) v[i] = static_cast<float>(i) + 0.5f;
  return v;
}

std::unique_ptr<PeerMailbox> NewMailbox(int64_t max_pending_bytes = 1 << 20) {
  PeerMailboxOptions options;
  options.max_pending_bytes = max_pending_bytes;
  auto mailbox = PeerMailbox::Create(options);
  EXPECT_TRUE(mailbox.ok()) << mailbox.status();
  return std::move(*mailbox);
}

TEST(DescribeKeyTest, Kinds) {
  EXPECT_EQ(DescribeKey(Key(ACTIVATION, 3, 1)),
            "ACTIVATION of step 3 micro-batch 1");
  EXPECT_EQ(DescribeKey(Key(ACTIVATION_GRAD, 4, 0)),
            "ACTIVATION_GRAD of step 4 micro-batch 0");
  TransferKey ar = Key(ALL_REDUCE, 3, 0);
  ar.seq = 2;
  ar.round = 1;
  EXPECT_EQ(DescribeKey(ar), "ALL_REDUCE #2 round 1 of step 3");
  ar.eval = true;
  EXPECT_EQ(DescribeKey(ar), "eval ALL_REDUCE #2 round 1 of step 3");
}

TEST(PeerMailboxTest, CreateRejectsNonPositiveLimit) {
  PeerMailboxOptions options;
  options.max_pending_bytes = 0;
  EXPECT_EQ(PeerMailbox::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PeerMailboxTest, CreateRejectsNegativeSpareBytes) {
  PeerMailboxOptions options;
  options.max_spare_bytes = -1;
  EXPECT_EQ(PeerMailbox::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A recycled buffer stores a later transfer of the same or a smaller size
// (its memory is reused, its old values never show); beyond
// max_spare_bytes buffers are freed, not kept.
TEST(PeerMailboxTest, RecycledBuffersAreReused) {
  PeerMailboxOptions options;
  options.max_spare_bytes = 4 * 100;
  auto created = PeerMailbox::Create(options);
  ASSERT_TRUE(created.ok()) << created.status();
  PeerMailbox& mailbox = **created;
  TransferKey key = Key();
  ASSERT_TRUE(mailbox.Deliver({Msg(key, 100, 0, 100)}).ok());
  auto got = mailbox.Receive(key, absl::Seconds(1), kPeer);
  ASSERT_TRUE(got.ok()) << got.status();
  const float* memory = got->data();
  mailbox.Recycle(*std::move(got));
  EXPECT_EQ(mailbox.spare_bytes(), 400);
  EXPECT_EQ(mailbox.pending_bytes(), 0);
  // A smaller transfer in two pieces lands in the recycled memory.
  key.micro_batch = 1;
  ASSERT_TRUE(mailbox.Deliver({Msg(key, 10, 5, 5)}).ok());
  EXPECT_EQ(mailbox.spare_bytes(), 0);
  ASSERT_TRUE(mailbox.Deliver({Msg(key, 10, 0, 5)}).ok());
  got = mailbox.Receive(key, absl::Seconds(1), kPeer);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->data(), memory);
  EXPECT_EQ(*got, Expected(10));
  mailbox.Recycle(*std::move(got));
  EXPECT_EQ(mailbox.spare_bytes(), 400);
  // Over the cap: freed.
  mailbox.Recycle(std::vector<float>(1));
  EXPECT_EQ(mailbox.spare_bytes(), 400);
  mailbox.Recycle(std::vector<float>());
  EXPECT_EQ(mailbox.spare_bytes(), 400);
  // A larger transfer than any spare gets a new buffer; the spare stays.
  key.micro_batch = 2;
  ASSERT_TRUE(mailbox.Deliver({Msg(key, 200, 0, 200)}).ok());
  EXPECT_EQ(mailbox.spare_bytes(), 400);
  got = mailbox.Receive(key, absl::Seconds(1), kPeer);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, Expected(200));
}

TEST(PeerMailboxTest, PiecesOutOfOrderOverSeveralStreams) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  auto r = mailbox->Deliver({Msg(key, 10, 6, 4)});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 4);
  r = mailbox->Deliver({Msg(key, 10, 3, 3), Msg(key, 10, 0, 3)});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 6);
  EXPECT_EQ(mailbox->transfers_completed(), 1);
  EXPECT_EQ(mailbox->bytes_received(), 40);
  EXPECT_EQ(mailbox->pending_bytes(), 40);
  auto got = mailbox->Receive(key, absl::Seconds(1), kPeer);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, Expected(10));
  EXPECT_EQ(mailbox->pending_bytes(), 0);
  EXPECT_EQ(mailbox->pending_transfers(), 0);
}

// What WorkerPeerService hands over: messages read in place from gRPC's
// buffers, payloads in many slices with values split between two.
TEST(PeerMailboxTest, MessagesReadInPlaceFromSplitBuffers) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  std::mt19937 rng(5);
  std::vector<PeerMessageView> views(3);
  const PeerMessage messages[3] = {Msg(key, 3000, 1000, 2000),
                                   Msg(key, 3000, 0, 999), Msg(key, 3000, 999, 1)};
  int64_t parts = 0;
  for (int m = 0; m < 3; ++m) {
    const std::string bytes = messages[m].SerializeAsString();
    std::vector<grpc::Slice> slices;
    for (size_t at = 0; at < bytes.size();) {
      const size_t n = std::min<size_t>(bytes.size() - at, 1 + rng() % 61);
      slices.emplace_back(bytes.data() + at, n);
      at += n;
    }
    ASSERT_TRUE(ParsePeerMessage(grpc::ByteBuffer(slices.data(), slices.size()),
                                 &views[m])
                    .ok());
    parts += static_cast<int64_t>(views[m].data.parts().size());
  }
  ASSERT_GT(parts, 100);
  auto r = mailbox->Deliver(views);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 3000);
  auto got = mailbox->Receive(key, absl::Seconds(1), kPeer);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, Expected(3000));
}

TEST(PeerMailboxTest, SeveralTransfersInOneStreamAndEmptyTransfer) {
  auto mailbox = NewMailbox();
  TransferKey a = Key(ACTIVATION, 1, 0);
  TransferKey b = Key(ACTIVATION_GRAD, 1, 0);
  TransferKey empty = Key(ALL_REDUCE, 1, 0);
  empty.seq = 4;
  auto r = mailbox->Deliver(
      {Msg(a, 3, 0, 3), Msg(b, 2, 1, 1), Msg(empty, 0, 0, 0), Msg(b, 2, 0, 1)});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 5);
  EXPECT_EQ(mailbox->transfers_completed(), 3);
  EXPECT_EQ(*mailbox->Receive(b, absl::Seconds(1), kPeer), Expected(2));
  EXPECT_EQ(*mailbox->Receive(a, absl::Seconds(1), kPeer), Expected(3));
  auto got = mailbox->Receive(empty, absl::Seconds(1), kPeer);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->empty());
}

TEST(PeerMailboxTest, KeysAreDistinguishedByEveryField) {
  auto mailbox = NewMailbox();
  TransferKey base = Key(ALL_REDUCE, 5, 0);
  std::vector<TransferKey> keys(7, base);
  keys[1].eval = true;
  keys[2].step = 6;
  keys[3].micro_batch = 1;
  keys[4].seq = 1;
  keys[5].round = 1;
  keys[6].sender = "other";
  std::vector<PeerMessage> stream;
  for (size_t i = 0; i < keys.size(); ++i) {
    stream.push_back(Msg(keys[i], 1, 0, 1));
  }
  ASSERT_TRUE(mailbox->Deliver(stream).ok());
  EXPECT_EQ(mailbox->pending_transfers(), 7);
  for (const TransferKey& k : keys) {
    EXPECT_TRUE(mailbox->Receive(k, absl::Seconds(1), kPeer).ok());
  }
}

// Every malformed stream starts with a valid message: nothing is stored.
void ExpectRejected(PeerMailbox* mailbox, PeerMessage bad,
                    const std::string& fragment) {
  const TransferKey good = Key(ACTIVATION, 9, 9, "good");
  auto r = mailbox->Deliver({Msg(good, 2, 0, 2), bad});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument)
      << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(fragment));
  EXPECT_EQ(mailbox->pending_transfers(), 0);
  EXPECT_EQ(mailbox->bytes_received(), 0);
}

TEST(PeerMailboxTest, RejectsMalformedMessages) {
  auto mailbox = NewMailbox(1 << 20);
  const TransferKey key = Key();
  PeerMessage m = Msg(key, 10, 0, 2);
  m.mutable_data()->push_back('x');
  ExpectRejected(mailbox.get(), m, "not a multiple of 4");
  m = Msg(key, 10, 0, 2);
  m.set_kind(PEER_KIND_UNSPECIFIED);
  ExpectRejected(mailbox.get(), m, "unknown kind");
  m = Msg(key, 10, 0, 2);
  m.set_kind(static_cast<PeerKind>(17));
  ExpectRejected(mailbox.get(), m, "unknown kind 17");
  m = Msg(key, 10, 0, 2);
  m.clear_sender();
  ExpectRejected(mailbox.get(), m, "empty sender");
  m = Msg(key, 10, 0, 0);
  m.set_total_elements(-1);
  ExpectRejected(mailbox.get(), m, "total_elements -1");
  m = Msg(key, 10, 0, 0);
  m.set_total_elements((1 << 20) / 4 + 1);
  ExpectRejected(mailbox.get(), m, "outside [0, 262144]");
  ExpectRejected(mailbox.get(), Msg(key, 10, 9, 2), "outside the transfer");
  ExpectRejected(mailbox.get(), Msg(key, 10, -1, 1), "outside the transfer");
  ExpectRejected(mailbox.get(), Msg(key, 1, 0, 2), "outside the transfer");
}

TEST(PeerMailboxTest, RejectsDuplicatesAndOverlapWithinAStream) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  auto r = mailbox->Deliver({Msg(key, 10, 0, 4), Msg(key, 10, 0, 4)});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("delivered twice"));
  r = mailbox->Deliver({Msg(key, 10, 5, 5), Msg(key, 10, 0, 6)});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(mailbox->pending_transfers(), 0);
  // Adjacent pieces and empty pieces are fine.
  r = mailbox->Deliver(
      {Msg(key, 10, 5, 5), Msg(key, 10, 0, 5), Msg(key, 10, 5, 0)});
  EXPECT_TRUE(r.ok()) << r.status();
}

TEST(PeerMailboxTest, RejectsOverlapWithStoredPieces) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  ASSERT_TRUE(mailbox->Deliver({Msg(key, 10, 2, 2)}).ok());
  ASSERT_TRUE(mailbox->Deliver({Msg(key, 10, 6, 2)}).ok());
  for (auto [offset, n] : std::vector<std::pair<int, int>>{
           {0, 3}, {3, 1}, {2, 2}, {1, 6}, {7, 3}, {5, 2}}) {
    // A valid transfer first: the whole stream is refused.
    auto r = mailbox->Deliver(
        {Msg(Key(ACTIVATION, 3, 2), 1, 0, 1), Msg(key, 10, offset, n)});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument)
        << offset << "+" << n;
    EXPECT_THAT(std::string(r.status().message()),
                HasSubstr("already received"));
  }
  EXPECT_EQ(mailbox->bytes_received(), 16);
  EXPECT_EQ(mailbox->pending_transfers(), 1);
  // The gaps are still accepted and complete the transfer.
  ASSERT_TRUE(mailbox
                  ->Deliver({Msg(key, 10, 0, 2), Msg(key, 10, 4, 2),
                             Msg(key, 10, 8, 2)})
                  .ok());
  EXPECT_EQ(*mailbox->Receive(key, absl::Seconds(1), kPeer), Expected(10));
}

TEST(PeerMailboxTest, RejectsInconsistentTotal) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  auto r = mailbox->Deliver({Msg(key, 10, 0, 2), Msg(key, 12, 2, 2)});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("disagrees"));
  ASSERT_TRUE(mailbox->Deliver({Msg(key, 10, 0, 2)}).ok());
  r = mailbox->Deliver({Msg(key, 12, 2, 2)});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("disagrees"));
  EXPECT_EQ(mailbox->bytes_received(), 8);
}

TEST(PeerMailboxTest, RejectsACompleteUnclaimedTransfer) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  ASSERT_TRUE(mailbox->Deliver({Msg(key, 4, 0, 4)}).ok());
  auto r = mailbox->Deliver({Msg(key, 4, 0, 0)});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("not yet claimed"));
  ASSERT_TRUE(mailbox->Receive(key, absl::Seconds(1), kPeer).ok());
  // Once claimed, the same key is a new transfer.
  EXPECT_TRUE(mailbox->Deliver({Msg(key, 4, 0, 4)}).ok());
}

TEST(PeerMailboxTest, PendingBytesLimit) {
  auto mailbox = NewMailbox(100);
  const TransferKey a = Key(ACTIVATION, 1, 0);
  const TransferKey b = Key(ACTIVATION, 1, 1);
  ASSERT_TRUE(mailbox->Deliver({Msg(a, 20, 0, 1)}).ok());  // 80 bytes
  auto r = mailbox->Deliver({Msg(b, 20, 0, 20)});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(mailbox->pending_transfers(), 1);
  // More pieces of a stored transfer need no more room.
  ASSERT_TRUE(mailbox->Deliver({Msg(a, 20, 1, 19)}).ok());
  ASSERT_TRUE(mailbox->Receive(a, absl::Seconds(1), kPeer).ok());
  EXPECT_TRUE(mailbox->Deliver({Msg(b, 20, 0, 20)}).ok());
}

TEST(PeerMailboxTest, TimeoutNamesThePeerAndWhatArrived) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  const absl::Time start = absl::Now();
  auto r = mailbox->Receive(key, absl::Milliseconds(200), kPeer);
  const absl::Duration elapsed = absl::Now() - start;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(r.status().message(),
            std::string("timed out after 200ms waiting for ACTIVATION of step "
                        "3 micro-batch 1 from ") +
                kPeer + " (nothing arrived)");
  EXPECT_GE(elapsed, absl::Milliseconds(200));
  EXPECT_LT(elapsed, absl::Seconds(5));

  ASSERT_TRUE(mailbox->Deliver({Msg(key, 4096, 0, 3)}).ok());
  ASSERT_TRUE(mailbox->Deliver({Msg(Key(ACTIVATION, 4, 1), 1, 0, 1)}).ok());
  r = mailbox->Receive(key, absl::Milliseconds(50), kPeer);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("(3 of 4096 elements arrived)"));
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("ACTIVATION of step 4 micro-batch 1"));
}

TEST(PeerMailboxTest, ReceiveWaitsForDelivery) {
  auto mailbox = NewMailbox();
  const TransferKey key = Key();
  std::thread sender([&] {
    absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(mailbox->Deliver({Msg(key, 8, 4, 4)}).ok());
    absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(mailbox->Deliver({Msg(key, 8, 0, 4)}).ok());
  });
  auto got = mailbox->Receive(key, absl::Seconds(10), kPeer);
  sender.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, Expected(8));
}

TEST(PeerMailboxTest, ShutdownWakesWaiters) {
  auto mailbox = NewMailbox();
  std::vector<std::thread> waiters;
  std::vector<absl::Status> results(3);
  const absl::Time start = absl::Now();
  for (int i = 0; i < 3; ++i) {
    waiters.emplace_back([&, i] {
      results[i] = mailbox->Receive(Key(ACTIVATION, 1, i), absl::Seconds(60),
                                    kPeer)
                       .status();
    });
  }
  absl::SleepFor(absl::Milliseconds(100));
  mailbox->Shutdown();
  for (std::thread& t : waiters) t.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  for (const absl::Status& s : results) {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(kPeer));
  }
  EXPECT_EQ(mailbox->Deliver({Msg(Key(), 1, 0, 1)}).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(PeerMailboxTest, DropBefore) {
  auto mailbox = NewMailbox();
  const TransferKey old_partial = Key(ACTIVATION, 1, 0);
  const TransferKey old_complete = Key(ACTIVATION_GRAD, 2, 0);
  TransferKey old_eval = Key(ACTIVATION, 1, 0);
  old_eval.eval = true;
  const TransferKey current = Key(ACTIVATION, 3, 0);
  ASSERT_TRUE(mailbox
                  ->Deliver({Msg(old_partial, 10, 0, 5),
                             Msg(old_complete, 2, 0, 2), Msg(old_eval, 1, 0, 1),
                             Msg(current, 3, 0, 3)})
                  .ok());
  EXPECT_EQ(mailbox->pending_bytes(), 4 * (10 + 2 + 1 + 3));
  mailbox->DropBefore(3);
  EXPECT_EQ(mailbox->pending_transfers(), 2);
  EXPECT_EQ(mailbox->pending_bytes(), 4 * (1 + 3));
  EXPECT_EQ(
      mailbox->Receive(old_complete, absl::Milliseconds(10), kPeer).status()
          .code(),
      absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(mailbox->Receive(old_eval, absl::Seconds(1), kPeer).ok());
  EXPECT_TRUE(mailbox->Receive(current, absl::Seconds(1), kPeer).ok());
  // A dropped transfer can be delivered afresh (e.g. a retried step).
  EXPECT_TRUE(mailbox->Deliver({Msg(old_partial, 10, 0, 10)}).ok());
  EXPECT_EQ(*mailbox->Receive(old_partial, absl::Seconds(1), kPeer),
            Expected(10));
}

// Once the job's workers are known, transfers from anyone else are refused
// before anything is stored, and those stored before are dropped: a client
// that is not a worker cannot fill the mailbox with transfers nobody claims.
TEST(PeerMailboxTest, SetSendersRefusesOthersAndDropsTheirTransfers) {
  auto mailbox = NewMailbox();
  const TransferKey stranger = Key(ACTIVATION, 3, 0, "intruder");
  const TransferKey peer = Key(ACTIVATION, 3, 0, "w2");
  // Before SetSenders every sender is accepted (a peer may be faster).
  ASSERT_TRUE(mailbox->Deliver({Msg(stranger, 1000, 0, 10)}).ok());
  ASSERT_TRUE(mailbox->Deliver({Msg(peer, 4, 0, 2)}).ok());
  EXPECT_EQ(mailbox->pending_bytes(), 4 * (1000 + 4));
  mailbox->SetSenders({"w1", "w2"});
  EXPECT_EQ(mailbox->pending_transfers(), 1);
  EXPECT_EQ(mailbox->pending_bytes(), 4 * 4);
  // A stream with one unknown sender (an enormous id) stores nothing.
  const TransferKey huge = Key(ACTIVATION, 5, 0, std::string(100000, 'x'));
  absl::StatusOr<int64_t> refused =
      mailbox->Deliver({Msg(peer, 4, 2, 2), Msg(huge, 1000, 0, 1)});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied)
      << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("not a worker of this job (w1, w2)"));
  EXPECT_LT(refused.status().message().size(), 400u);
  EXPECT_EQ(mailbox->pending_transfers(), 1);
  EXPECT_EQ(mailbox->pending_bytes(), 4 * 4);
  EXPECT_EQ(mailbox->Deliver({Msg(stranger, 10, 0, 10)}).status().code(),
            absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(mailbox->Deliver({Msg(peer, 4, 2, 2)}).ok());
  EXPECT_EQ(*mailbox->Receive(peer, absl::Seconds(1), kPeer), Expected(4));
}

}  // namespace
}  // namespace lmps
