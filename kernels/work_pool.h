// work_pool.h -- the persistent thread pool of the CPU projector (projector_cpu.cpp only).
//
// parallel_for(n, chunk, fn, ctx) splits [0, n) into chunks; the caller and the workers
// claim chunks from one atomic counter until none is left, then the caller waits for the
// chunks in flight.  Nothing waits for a worker that never woke up: on a loaded machine a
// descheduled worker simply claims nothing, so one busy core does not stall a forward.
// The counter packs (generation, chunk count, next chunk) into 64 bits, so a late worker can
// only claim chunks of the job it read the counter for, and job fields are published before
// the counter (release) and rewritten only once no chunk is in flight.
// No allocation per call.  Twins: none (host-side plumbing).
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__linux__)
#include <sched.h>
#endif

namespace scops {
namespace cpu {

class WorkPool {
   public:
    using Fn = void (*)(void* ctx, int tid, int64_t begin, int64_t end);
    // Counter layout: generation in bits 40..63, chunk count in 20..39, next chunk in 0..19.
    static constexpr int64_t kMaxChunks = int64_t(1) << 20;

    explicit WorkPool(int n) {
        try {
            for (int t = 1; t < n; ++t) workers_.emplace_back([this, t] { loop(t); });
        } catch (...) {  // thread creation failed: stop the ones already running
            shutdown();
            throw;
        }
    }
    ~WorkPool() { shutdown(); }
    int size() const { return int(workers_.size()) + 1; }

    // fn(ctx, tid, begin, end) over [0, n) in chunks of `chunk` (rounded up so that there
    // are at most kMaxChunks); serial on the caller when `parallel` is false.
    void parallel_for(int64_t n, int64_t chunk, bool parallel, Fn fn, void* ctx) {
        if (n <= 0) return;
        chunk = std::max(chunk, (n + kMaxChunks - 1) / kMaxChunks);
        if (!parallel || workers_.empty()) {
            for (int64_t b = 0; b < n; b += chunk) fn(ctx, 0, b, std::min(n, b + chunk));
            return;
        }
        fn_ = fn;
        ctx_ = ctx;
        n_ = n;
        chunk_ = chunk;
        const uint64_t chunks = uint64_t((n + chunk - 1) / chunk);
        caller_cpu_.store(current_cpu(), std::memory_order_relaxed);  // published by counter_
        gen_ = (gen_ + 1) & 0xffffffu;
        counter_.store((gen_ << 40) | (chunks << 20));  // publishes the fields above
        {
            std::lock_guard<std::mutex> lk(m_);  // pairs with the sleepers' predicate check
        }
        cv_.notify_all();
        help(0, gen_);
        for (int i = 0; busy_.load() != 0; ++i) {  // chunks other threads still run
            if (i < kSpinIters) cpu_relax();
            else std::this_thread::yield();
        }
    }

   private:
    // Spins before a worker sleeps on the condition variable (~50-100 us of pauses).
    static constexpr int kSpinIters = 20000;
    static constexpr uint64_t kMask20 = (uint64_t(1) << 20) - 1;

    static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
    }
    // Claims and runs chunks of generation g until none is left.
    void help(int tid, uint64_t g) {
        busy_.fetch_add(1);
        for (;;) {
            uint64_t v = counter_.load();
            const uint64_t next = v & kMask20, total = (v >> 20) & kMask20;
            if ((v >> 40) != g || next >= total) break;
            if (!counter_.compare_exchange_weak(v, v + 1)) continue;
            const int64_t b = int64_t(next) * chunk_;  // fields are stable while we hold busy_
            fn_(ctx_, tid, b, std::min(n_, b + chunk_));
        }
        busy_.fetch_sub(1);
    }
    static int current_cpu() {
#if defined(__linux__)
        return sched_getcpu();
#else
        return -1;
#endif
    }
    // Both threads of a 2-thread job sharing one CPU while the other CPU idles is common
    // (wake-up placement after a sleep); the kernel's load balancer takes milliseconds to
    // notice two spinning/computing threads, so whole bursts of short calls ran at one
    // core's speed (measured: 1x1024x5120 fp16 p50 ~160 us stuck vs ~80 us spread).  A
    // worker that wakes for a job on the caller's CPU therefore narrows its own affinity
    // to the process's CPUs minus that one (the caller's affinity is never touched).
    // Which thread runs a chunk never changes the result.
    struct Placement {
#if defined(__linux__)
        cpu_set_t allowed;
        bool ok = false;
        Placement() { ok = sched_getaffinity(0, sizeof allowed, &allowed) == 0 && CPU_COUNT(&allowed) > 1; }
        void avoid(int caller) {
            if (!ok || caller < 0 || caller >= CPU_SETSIZE || !CPU_ISSET(caller, &allowed)) return;
            if (sched_getcpu() != caller) return;
            cpu_set_t m = allowed;
            CPU_CLR(caller, &m);
            sched_setaffinity(0, sizeof m, &m);  // moves this thread now; failure is harmless
        }
#else
        void avoid(int) {}
#endif
    };
    void loop(int tid) {
        Placement place;
        uint64_t seen = 0;
        for (;;) {
            for (int i = 0; (counter_.load() >> 40) == seen && !stop_.load() && i < kSpinIters; ++i) cpu_relax();
            if ((counter_.load() >> 40) == seen && !stop_.load()) {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return (counter_.load() >> 40) != seen || stop_.load(); });
            }
            if (stop_.load()) return;
            seen = counter_.load() >> 40;
            place.avoid(caller_cpu_.load(std::memory_order_relaxed));
            help(tid, seen);
        }
    }
    void shutdown() {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_.store(true);
        }
        cv_.notify_all();
        for (auto& w : workers_) w.join();
        workers_.clear();
    }

    std::vector<std::thread> workers_;
    std::mutex m_;
    std::condition_variable cv_;
    std::atomic<uint64_t> counter_{0};
    std::atomic<int> busy_{0};
    std::atomic<int> caller_cpu_{-1};
    std::atomic<bool> stop_{false};
    uint64_t gen_ = 0;  // caller side only
    Fn fn_ = nullptr;
    void* ctx_ = nullptr;
    int64_t n_ = 0, chunk_ = 1;
};

}  // namespace cpu
}  // namespace scops
