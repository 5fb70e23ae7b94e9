// The emulator's scheduler (see emu.h): blocks run one after another (the blocks of a cluster on threads of their
// own, one at a time, handing over at cluster barriers); the threads of a block are fibers switched only at
// synchronization points. Also the emulated device queries, launch checks and the test hooks registered
// as torch.ops.eventful_emu._set_device / _launches.
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <ucontext.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

namespace emu {

thread_local Thread* current_thread = nullptr;
thread_local Block* current_block = nullptr;

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr unsigned kMaxThreads = 1024;

// Emulated devices: their SM counts (device 0: an H200's 132 SMs; the others give other grid sizes) and compute
// capabilities (device 1 predates clusters).
constexpr int kSms[] = {132, 1, 2, 3, 7};
constexpr int kMajor[] = {9, 8, 9, 9, 9};
constexpr unsigned kMaxClusterBlocks = 8;  // the portable cluster size
int current_device_index = 2;
int64_t launch_count = 0;
std::vector<int64_t> launch_widths;  // per launch since the last _launch_log(): its widest cast access in bytes
cudaError_t last_error = cudaSuccess;

struct Fiber {
  Thread t;
  ucontext_t ctx;
  char* stack = nullptr;
  bool done = false;
  const uint64_t* wait_on = nullptr;  // a barrier generation this fiber waits to change
  uint64_t wait_value = 0;
};

struct WarpBarrier {
  unsigned mask = 0, arrived = 0;
  uint64_t gen = 0;
  const char* what = nullptr;
};

struct WarpState {
  unsigned present = 0, exited = 0;
  uint64_t slots[32] = {};
  std::deque<WarpBarrier> barriers;  // one per mask used; those with lanes waiting have disjoint masks
};

struct BlockRun {
  Block block;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  unsigned live = 0, block_arrived = 0, cluster_arrived = 0;
  uint64_t block_gen = 0, cluster_gen = 0;
  ucontext_t sched;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  Fiber* running = nullptr;
  std::string error;
};

thread_local BlockRun* run = nullptr;

// The blocks of one cluster: each runs on a pool thread holding `baton` while it runs, so one runs at a time.
struct ClusterRun {
  std::mutex baton;
  std::condition_variable changed;
  unsigned size = 1, arrived = 0, finished = 0, first_failed = 0;
  uint64_t gen = 0;
  bool failed = false;
};

struct ClusterSeat {
  ClusterRun* cluster = nullptr;
  std::unique_lock<std::mutex>* baton = nullptr;
  unsigned rank = 0;
};
thread_local ClusterSeat seat;
thread_local std::vector<std::unique_ptr<char[]>> stacks;

void yield_to_scheduler() { swapcontext(&run->running->ctx, &run->sched); }

std::string where() {
  const Thread& t = run->running->t;
  const Block& b = run->block;
  return " (block (" + std::to_string(b.block_idx.x) + "," + std::to_string(b.block_idx.y) + "," +
         std::to_string(b.block_idx.z) + "), thread (" + std::to_string(t.thread_idx.x) + "," +
         std::to_string(t.thread_idx.y) + "," + std::to_string(t.thread_idx.z) + "))";
}

void wait_for_change(const uint64_t* gen) {
  Fiber* f = run->running;
  f->wait_on = gen;
  f->wait_value = *gen;
  while (*gen == f->wait_value) yield_to_scheduler();
  f->wait_on = nullptr;
}

void warp_barrier(unsigned mask, const char* what) {
  Fiber* f = run->running;
  WarpState& w = run->warps[f->t.warp];
  const unsigned bit = 1u << f->t.lane;
  if (!(mask & bit)) device_fail((std::string(what) + ": the calling lane is not in the mask").c_str());
  if (mask & ~w.present) device_fail((std::string(what) + ": the mask names lanes that do not exist").c_str());
  if (mask & w.exited) device_fail((std::string(what) + ": the mask names lanes that have exited").c_str());
  WarpBarrier* b = nullptr;
  for (WarpBarrier& x : w.barriers) {
    if (x.arrived != 0 && (x.mask & mask)) {
      if (x.mask != mask || std::strcmp(x.what, what) != 0)
        device_fail((std::string(what) + ": lanes of one warp wait at different synchronization points").c_str());
      b = &x;
    }
  }
  if (b == nullptr) {
    for (WarpBarrier& x : w.barriers)
      if (x.arrived == 0 && x.mask == mask) b = &x;
    if (b == nullptr) b = &w.barriers.emplace_back();  // a deque: waiting lanes keep their pointers
    b->mask = mask;
    b->what = what;
  }
  b->arrived |= bit;
  if (b->arrived == mask) {  // the last lane releases the others
    ++b->gen;
    b->arrived = 0;
    return;
  }
  wait_for_change(&b->gen);
}

void fiber_main() {
  BlockRun* r = run;
  r->body(r->ctx);
  if (r->cluster_arrived != 0) device_fail("a thread exited while others of its block wait at cluster.sync()");
  Fiber* f = r->running;
  f->done = true;
  WarpState& w = r->warps[f->t.warp];
  w.exited |= 1u << f->t.lane;
  for (const WarpBarrier& b : w.barriers) {
    if (b.arrived != 0 && (b.mask & (1u << f->t.lane)))
      device_fail((std::string(b.what) + ": a lane named in the mask exited while others wait for it").c_str());
  }
  --r->live;
  if (r->block_arrived != 0 && r->block_arrived == r->live) {
    ++r->block_gen;
    r->block_arrived = 0;
  }
  // returning resumes uc_link (the scheduler)
}

void run_block(BlockRun& r) {
  const dim3 bd = r.block.block_dim;
  const unsigned n = bd.x * bd.y * bd.z;
  while (stacks.size() < n) stacks.emplace_back(new char[kStackBytes]);
  r.fibers.assign(n, Fiber{});
  r.warps.assign((n + 31) / 32, WarpState{});
  r.live = n;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.t.thread_idx = {i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    f.t.lane = i % 32;
    f.t.warp = i / 32;
    r.warps[f.t.warp].present |= 1u << f.t.lane;
    f.stack = stacks[i].get();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  current_block = &r.block;
  while (r.live > 0) {
    bool progressed = false;
    for (Fiber& f : r.fibers) {
      if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_value)) continue;
      r.running = &f;
      current_thread = &f.t;
      swapcontext(&r.sched, &f.ctx);
      if (!r.error.empty()) TORCH_CHECK(false, "CUDA emulator: ", r.error);
      progressed = true;
    }
    if (!progressed) {
      TORCH_CHECK(false, "CUDA emulator: deadlock in block (", r.block.block_idx.x, ",", r.block.block_idx.y, ",",
                  r.block.block_idx.z, "): ", r.live,
                  " threads wait at synchronization points the others never reach");
    }
  }
}

cudaError_t check_config(const LaunchConfig& c) {
  const dim3 g = c.grid, b = c.block;
  if (g.x < 1 || g.x > 2147483647u || g.y < 1 || g.y > 65535 || g.z < 1 || g.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (b.x < 1 || b.y < 1 || b.z < 1 || b.x > 1024 || b.y > 1024 || b.z > 64) return cudaErrorInvalidConfiguration;
  const uint64_t threads = static_cast<uint64_t>(b.x) * b.y * b.z;
  if (threads > kMaxThreads || c.shmem > 48 * 1024) return cudaErrorInvalidConfiguration;
  if (!c.clustered) return cudaSuccess;
  if (kMajor[current_device_index] < 9) return cudaErrorNotSupported;
  const dim3 k = c.cluster;
  const uint64_t blocks = static_cast<uint64_t>(k.x) * k.y * k.z;
  // a cluster must fit the device at once: at most 2048 threads per SM
  const uint64_t fit = static_cast<uint64_t>(kSms[current_device_index]) * (2048 / threads);
  if (blocks < 1 || blocks > kMaxClusterBlocks || blocks > fit || g.x % k.x || g.y % k.y || g.z % k.z)
    return cudaErrorInvalidClusterSize;
  return cudaSuccess;
}

// Threads that run the blocks of a cluster (thread_local __shared__ and fiber stacks per thread, kept for reuse).
class Pool {
 public:
  // Runs every task at the same time, each on a thread of its own; returns when all have returned.
  void run_all(std::vector<std::function<void()>>& tasks) {
    std::unique_lock<std::mutex> lk(m_);
    while (threads_ < tasks.size()) {
      std::thread([this] { work(); }).detach();  // idle threads live as long as the process
      ++threads_;
    }
    for (auto& t : tasks) queue_.push_back(&t);
    pending_ = tasks.size();
    wake_.notify_all();
    done_.wait(lk, [&] { return pending_ == 0; });
  }

 private:
  void work() {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      wake_.wait(lk, [&] { return !queue_.empty(); });
      std::function<void()>* task = queue_.front();
      queue_.pop_front();
      lk.unlock();
      (*task)();
      lk.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::mutex m_;
  std::condition_variable wake_, done_;
  std::deque<std::function<void()>*> queue_;
  size_t threads_ = 0, pending_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads wait for work until the process ends
  return *p;
}

}  // namespace

void device_fail(const char* what) {
  run->error = std::string(what) + where();
  swapcontext(&run->running->ctx, &run->sched);
  __builtin_unreachable();  // never resumed
}

void misaligned(const void* p, size_t align) {
  const std::string what = "misaligned address: a " + std::to_string(align) + "-byte access at an address = " +
                           std::to_string(reinterpret_cast<uintptr_t>(p) % 16) + " (mod 16)";
  if (run == nullptr || run->running == nullptr) TORCH_CHECK(false, "CUDA emulator: ", what, " (host code)");
  device_fail(what.c_str());
}

uint64_t warp_exchange(uint64_t value, int src_lane, unsigned mask, const char* what) {
  WarpState& w = run->warps[run->running->t.warp];
  if (src_lane < 0 || src_lane > 31 || !(mask & (1u << src_lane)))
    device_fail((std::string(what) + ": the source lane is not in the mask").c_str());
  w.slots[run->running->t.lane] = value;
  warp_barrier(mask, what);  // every lane has written its slot
  const uint64_t out = w.slots[src_lane];
  warp_barrier(mask, what);  // every lane has read before any slot is written again
  return out;
}

unsigned warp_ballot(unsigned mask, bool predicate) {
  WarpState& w = run->warps[run->running->t.warp];
  w.slots[run->running->t.lane] = predicate;
  warp_barrier(mask, "__ballot_sync");
  unsigned out = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && w.slots[l]) out |= 1u << l;
  warp_barrier(mask, "__ballot_sync");
  return out;
}

void warp_sync(unsigned mask) { warp_barrier(mask, "__syncwarp"); }

void cluster_sync() {
  BlockRun& r = *run;
  ++r.cluster_arrived;
  if (r.cluster_arrived != r.live) {
    wait_for_change(&r.cluster_gen);
    return;
  }
  // the block's last thread waits for the other blocks of the cluster, then releases its own
  if (seat.cluster != nullptr) {
    ClusterRun& c = *seat.cluster;
    if (c.failed) device_fail("cluster.sync(): another block of the cluster failed");
    const uint64_t gen = c.gen;
    if (++c.arrived == c.size) {
      c.arrived = 0;
      ++c.gen;
      c.changed.notify_all();
    } else {
      c.changed.wait(*seat.baton, [&] { return c.gen != gen || c.failed || c.finished > 0; });
      if (c.gen == gen) device_fail("cluster.sync(): another block of the cluster failed or exited without it");
    }
  }
  ++r.cluster_gen;
  r.cluster_arrived = 0;
}

unsigned cluster_block_rank() { return seat.rank; }
unsigned cluster_num_blocks() { return seat.cluster != nullptr ? seat.cluster->size : 1u; }

void block_sync() {
  BlockRun& r = *run;
  ++r.block_arrived;
  if (r.block_arrived == r.live) {
    ++r.block_gen;
    r.block_arrived = 0;
    return;
  }
  wait_for_change(&r.block_gen);
}

void note_access_width(size_t bytes) {
  if (run == nullptr || launch_widths.empty()) return;  // host code
  launch_widths.back() = std::max<int64_t>(launch_widths.back(), static_cast<int64_t>(bytes));
}

namespace {

// Every cluster of the grid in turn; the blocks of one cluster together, on pool threads.
void run_clusters(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  const dim3 k = cfg.cluster;
  const unsigned size = k.x * k.y * k.z;
  for (unsigned cz = 0; cz < cfg.grid.z; cz += k.z)
    for (unsigned cy = 0; cy < cfg.grid.y; cy += k.y)
      for (unsigned cx = 0; cx < cfg.grid.x; cx += k.x) {
        ClusterRun cluster;
        cluster.size = size;
        std::vector<std::exception_ptr> errors(size);
        std::vector<std::function<void()>> tasks;
        for (unsigned rank = 0; rank < size; ++rank) {
          tasks.emplace_back([&, rank] {
            std::unique_lock<std::mutex> baton(cluster.baton);
            seat = {&cluster, &baton, rank};
            try {
              BlockRun r;
              r.body = body;
              r.ctx = ctx;
              r.block.block_dim = cfg.block;
              r.block.grid_dim = cfg.grid;
              r.block.block_idx = {cx + rank % k.x, cy + rank / k.x % k.y, cz + rank / (k.x * k.y)};
              run = &r;
              run_block(r);
            } catch (...) {
              errors[rank] = std::current_exception();
              if (!cluster.failed) cluster.first_failed = rank;
              cluster.failed = true;
            }
            run = nullptr;
            current_thread = nullptr;
            current_block = nullptr;
            seat = {};
            ++cluster.finished;
            cluster.changed.notify_all();
          });
        }
        pool().run_all(tasks);
        // the block that failed first (blocks run one at a time: the others fail only after it)
        if (cluster.failed) std::rethrow_exception(errors[cluster.first_failed]);
      }
}

}  // namespace

void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  ++launch_count;
  launch_widths.push_back(0);
  if (const cudaError_t err = check_config(cfg); err != cudaSuccess) {
    last_error = err;
    return;
  }
  if (cfg.clustered) {
    run_clusters(cfg, body, ctx);
    return;
  }
  BlockRun r;
  r.body = body;
  r.ctx = ctx;
  r.block.block_dim = cfg.block;
  r.block.grid_dim = cfg.grid;
  struct Restore {  // back to host code however the grid ends (a device error raises out of run_block)
    BlockRun* outer = run;
    ~Restore() {
      run = outer;
      current_thread = nullptr;
      current_block = nullptr;
    }
  } restore;
  run = &r;
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) {
        r.block.block_idx = {x, y, z};
        r.error.clear();
        run_block(r);
      }
}

int device_index() { return current_device_index; }

}  // namespace emu

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= static_cast<int>(sizeof(emu::kSms) / sizeof(int))) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::kSms[device]; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::kMajor[device]; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
  }
  return "unknown error";
}

namespace {

void set_device(int64_t d) {
  TORCH_CHECK(d >= 0 && d < static_cast<int64_t>(sizeof(emu::kSms) / sizeof(int)), "no emulated device ", d);
  emu::current_device_index = static_cast<int>(d);
}

int64_t launches() { return emu::launch_count; }

// The widest access (bytes) each kernel launched since the previous call made through a cast pointer (0: none,
// element-wise access only), in launch order; clears the log.
std::vector<int64_t> launch_log() {
  std::vector<int64_t> out;
  out.swap(emu::launch_widths);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful_emu, m) {
  m.def("_set_device(int device) -> ()", &set_device);
  m.def("_launches() -> int", &launches);
  m.def("_launch_log() -> int[]", &launch_log);
}
