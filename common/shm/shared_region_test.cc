#include "common/shm/shared_region.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sys/wait.h>

#include <cstdlib>
#include <set>
#include <cstring>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

bool IsRefusal(const absl::Status& s) {
  return s.code() == absl::StatusCode::kFailedPrecondition &&
         absl::StartsWith(s.message(), kSharedMemoryRefused);
}

TEST(SharedRegionTest, OpenSharesTheBytes) {
  auto made = SharedRegion::Create(1 << 20);
  ASSERT_TRUE(made.ok()) << made.status();
  const SharedRegion& a = **made;
  EXPECT_EQ(a.size(), SharedRegion::kHeaderBytes + (1 << 20));
  EXPECT_EQ(a.desc().token().size(), 16u);
  auto opened = SharedRegion::Open(a.desc());
  ASSERT_TRUE(opened.ok()) << opened.status();
  const SharedRegion& b = **opened;
  ASSERT_NE(a.data(), b.data());  // two mappings of the same pages
  std::strcpy(a.data() + SharedRegion::kHeaderBytes, "pulled");
  EXPECT_STREQ(b.data() + SharedRegion::kHeaderBytes, "pulled");
  b.data()[a.size() - 1] = 7;
  EXPECT_EQ(a.data()[a.size() - 1], 7);
}

TEST(SharedRegionTest, ThroughAnotherProcess) {
  auto made = SharedRegion::Create(4096);
  ASSERT_TRUE(made.ok()) << made.status();
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child opens the parent's region by its path and writes into it.
    auto opened = SharedRegion::Open((*made)->desc());
    if (!opened.ok()) _exit(2);
    std::strcpy((*opened)->data() + SharedRegion::kHeaderBytes, "pushed");
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_STREQ((*made)->data() + SharedRegion::kHeaderBytes, "pushed");
}

TEST(SharedRegionTest, RefusesWhatIsNotTheRegion) {
  auto made = SharedRegion::Create(4096);
  ASSERT_TRUE(made.ok()) << made.status();
  SharedRegionDesc desc = (*made)->desc();

  SharedRegionDesc token = desc;
  token.mutable_token()->at(3) ^= 1;
  EXPECT_TRUE(IsRefusal(SharedRegion::Open(token).status()));

  SharedRegionDesc size = desc;
  size.set_size(desc.size() + 4096);
  EXPECT_TRUE(IsRefusal(SharedRegion::Open(size).status()));

  for (const char* path : {"/etc/passwd", "/proc/1/fd/../../etc/passwd",
                           "/proc/self/fd/0", "/proc/1/fd/", "relative"}) {
    SharedRegionDesc bad = desc;
    bad.set_path(path);
    EXPECT_TRUE(IsRefusal(SharedRegion::Open(bad).status())) << path;
  }
  SharedRegionDesc gone = desc;
  gone.set_path(absl::StrCat("/proc/", getpid(), "/fd/99999"));
  EXPECT_TRUE(IsRefusal(SharedRegion::Open(gone).status()));

  // A regular file that is not a sealed memfd (it could be truncated under
  // the mapping).
  char name[] = "/tmp/shared_region_test_XXXXXX";
  const int file = mkstemp(name);
  ASSERT_GE(file, 0);
  unlink(name);
  ASSERT_EQ(ftruncate(file, desc.size()), 0);
  SharedRegionDesc plain = desc;
  plain.set_path(absl::StrCat("/proc/", getpid(), "/fd/", file));
  EXPECT_TRUE(IsRefusal(SharedRegion::Open(plain).status()));
  close(file);

  // A FIFO is refused without blocking on its open.
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  SharedRegionDesc fifo = desc;
  fifo.set_path(absl::StrCat("/proc/", getpid(), "/fd/", pipe_fds[0]));
  EXPECT_TRUE(IsRefusal(SharedRegion::Open(fifo).status()));
  close(pipe_fds[0]);
  close(pipe_fds[1]);
}

TEST(SharedRegionTest, CheckRange) {
  auto made = SharedRegion::Create(8192);
  ASSERT_TRUE(made.ok());
  const SharedRegion& r = **made;
  const int64_t h = SharedRegion::kHeaderBytes;
  EXPECT_TRUE(r.CheckRange(h, 8192).ok());
  EXPECT_TRUE(r.CheckRange(h + 8192, 0).ok());
  EXPECT_FALSE(r.CheckRange(0, 16).ok());  // the token
  EXPECT_FALSE(r.CheckRange(h, 8193).ok());
  EXPECT_FALSE(r.CheckRange(h + 1, -1).ok());
  EXPECT_FALSE(r.CheckRange(h + 8193, 0).ok());
  EXPECT_FALSE(r.CheckRange(h, INT64_MAX).ok());
}

TEST(WindowPoolTest, HandsOutEachWindowOnce) {
  auto pool = WindowPool::Create(3, 1000);
  ASSERT_TRUE(pool.ok());
  std::set<int64_t> got;
  for (int i = 0; i < 3; ++i) {
    std::optional<int64_t> w = (*pool)->Acquire();
    ASSERT_TRUE(w.has_value());
    EXPECT_TRUE((*pool)->region().CheckRange(*w, 1000).ok());
    got.insert(*w);
  }
  EXPECT_EQ(got.size(), 3u);
  EXPECT_FALSE((*pool)->Acquire().has_value());
  (*pool)->Release(*got.begin());
  EXPECT_EQ((*pool)->Acquire(), *got.begin());
  EXPECT_FALSE(WindowPool::Create(0, 10).ok());
}

// One pool per peer, created once; off when never enabled, after a failed
// creation (reported once) or after Disable, and off for good.
TEST(PeerWindowPoolsTest, CreatesOncePerPeerAndStaysOffOnceOff) {
  PeerWindowPools pools(3, /*enabled=*/true);
  absl::Status failure;
  WindowPool* p0 = pools.Get(0, 2, 1000, &failure);
  ASSERT_NE(p0, nullptr);
  EXPECT_TRUE(failure.ok());
  EXPECT_EQ(pools.Get(0, 5, 9999), p0);  // the first creation's
  EXPECT_EQ(p0->window_bytes(), 1000);
  WindowPool* p1 = pools.Get(1, 2, 1000);
  ASSERT_NE(p1, nullptr);
  EXPECT_NE(p1, p0);
  EXPECT_NE(p1->region().desc().token(), p0->region().desc().token());

  EXPECT_EQ(pools.Get(2, 0, 1000, &failure), nullptr);  // cannot be created
  EXPECT_EQ(failure.code(), absl::StatusCode::kInvalidArgument) << failure;
  failure = absl::OkStatus();
  EXPECT_EQ(pools.Get(2, 2, 1000, &failure), nullptr);
  EXPECT_TRUE(failure.ok()) << "reported once";
  EXPECT_FALSE(pools.Disable(2));

  EXPECT_TRUE(pools.Disable(1));
  EXPECT_FALSE(pools.Disable(1));
  EXPECT_EQ(pools.Get(1, 2, 1000), nullptr);
  EXPECT_EQ(pools.Get(0, 2, 1000), p0);

  PeerWindowPools off(2, /*enabled=*/false);
  EXPECT_EQ(off.Get(0, 2, 1000), nullptr);
  EXPECT_FALSE(off.Disable(0));
}

TEST(RegionCacheTest, OpensOnceEvictsIdleAndLeastRecent) {
  auto a = SharedRegion::Create(4096);
  auto b = SharedRegion::Create(4096);
  auto c = SharedRegion::Create(4096);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  RegionCache cache(/*capacity=*/2, /*idle=*/absl::Seconds(10));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  auto ga = cache.Get((*a)->desc(), t0);
  ASSERT_TRUE(ga.ok()) << ga.status();
  auto ga2 = cache.Get((*a)->desc(), t0 + absl::Seconds(1));
  ASSERT_TRUE(ga2.ok());
  EXPECT_EQ(ga->get(), ga2->get());  // opened once
  ASSERT_TRUE(cache.Get((*b)->desc(), t0 + absl::Seconds(2)).ok());
  ASSERT_TRUE(cache.Get((*a)->desc(), t0 + absl::Seconds(3)).ok());
  // c evicts the least recently used, b.
  ASSERT_TRUE(cache.Get((*c)->desc(), t0 + absl::Seconds(4)).ok());
  EXPECT_EQ(cache.size(), 2);
  auto gb = cache.Get((*b)->desc(), t0 + absl::Seconds(5));
  ASSERT_TRUE(gb.ok());
  EXPECT_EQ(cache.size(), 2);
  // A region still held by a request stays mapped after eviction.
  std::strcpy((*a)->data() + SharedRegion::kHeaderBytes, "held");
  EXPECT_STREQ((*ga)->data() + SharedRegion::kHeaderBytes, "held");
  // Everything idle for more than 10 s is closed at the next lookup.
  ASSERT_TRUE(cache.Get((*c)->desc(), t0 + absl::Seconds(30)).ok());
  EXPECT_EQ(cache.size(), 1);
  // Refusals pass through and cache nothing.
  SharedRegionDesc bad = (*a)->desc();
  bad.set_token(std::string(16, 'x'));
  EXPECT_TRUE(IsRefusal(cache.Get(bad, t0 + absl::Seconds(31)).status()));
  EXPECT_EQ(cache.size(), 1);
}

}  // namespace
}  // namespace lmps
