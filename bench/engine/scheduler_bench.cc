// Scheduler overhead per step, no model: the CPU time of Scheduler::Schedule() +
// CompleteStep() + appending the sampled tokens, with N running sequences.
//
// Scenarios (block size 16, prefix caching on, FCFS):
//   decode:  N sequences with 512-token prompts, all decoding (one token each per step);
//   mixed:   N sequences decoding, with new 512-token prompts arriving so that a prefill chunk
//            shares every step's token budget (max_num_batched_tokens = N + 256);
//   preempt: a KV pool too small for N growing sequences: preemption by recompute each step.
//
// Usage: scheduler_bench [--seqs=256] [--steps=2000]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "engine/sched/scheduler.h"

namespace moe {
namespace {

struct Result {
  double mean_us = 0, p50_us = 0, p99_us = 0;
  double tokens_per_step = 0;
  int64_t preemptions = 0;
};

std::vector<int32_t> Prompt(int32_t length, int32_t salt) {
  std::vector<int32_t> tokens(length);
  for (int32_t i = 0; i < length; ++i) tokens[i] = (salt * 7919 + i * 31) % 32000;
  return tokens;
}

Result Run(int32_t num_seqs, int32_t steps, int32_t num_blocks, int32_t budget,
           int32_t max_new_tokens, bool keep_arriving) {
  SchedulerOptions options;
  options.max_num_seqs = num_seqs;
  options.max_num_batched_tokens = budget;
  Scheduler scheduler(options, num_blocks, /*block_size=*/16);
  int64_t next_id = 0;
  std::vector<int32_t> generated;  // by id
  auto add = [&] {
    scheduler.Add(next_id, Prompt(512, static_cast<int32_t>(next_id)));
    generated.push_back(0);
    ++next_id;
  };
  for (int32_t i = 0; i < num_seqs; ++i) add();
  // Warm up: prefill everything.
  for (int guard = 0; guard < 100000 && scheduler.num_running() < num_seqs; ++guard) {
    StepPlan plan = scheduler.Schedule();
    scheduler.CompleteStep(plan);
    for (const ScheduledSequence& s : plan.scheduled) {
      if (s.logits_index >= 0) s.sequence->AppendToken(1);
    }
    if (plan.empty()) break;
  }

  std::vector<double> times;
  times.reserve(steps);
  int64_t tokens = 0;
  const int64_t preemptions_before = scheduler.counters().preemptions;
  for (int32_t step = 0; step < steps; ++step) {
    if (keep_arriving && scheduler.num_waiting() == 0) add();
    const auto start = std::chrono::steady_clock::now();
    StepPlan plan = scheduler.Schedule();
    scheduler.CompleteStep(plan);
    for (const ScheduledSequence& s : plan.scheduled) {
      if (s.logits_index < 0) continue;
      const int64_t id = s.sequence->id();
      s.sequence->AppendToken(static_cast<int32_t>((id * 13 + generated[id]) % 32000));
      if (++generated[id] >= max_new_tokens) {
        scheduler.Finish(id);
        add();
      }
    }
    const auto end = std::chrono::steady_clock::now();
    times.push_back(std::chrono::duration<double, std::micro>(end - start).count());
    tokens += plan.batch.num_tokens();
  }
  Result r;
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  for (double t : times) r.mean_us += t;
  r.mean_us /= times.size();
  r.p50_us = sorted[sorted.size() / 2];
  r.p99_us = sorted[sorted.size() * 99 / 100];
  r.tokens_per_step = static_cast<double>(tokens) / steps;
  r.preemptions = scheduler.counters().preemptions - preemptions_before;
  return r;
}

int ParseFlag(int argc, char** argv, const char* name, int fallback) {
  const std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) {
      return std::atoi(argv[i] + prefix.size());
    }
  }
  return fallback;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  const int seqs = moe::ParseFlag(argc, argv, "seqs", 256);
  const int steps = moe::ParseFlag(argc, argv, "steps", 2000);
  // Enough blocks for every sequence to reach 512 + 256 tokens (+ arrivals).
  const int roomy_blocks = (seqs + 8) * ((512 + 256) / 16 + 1);
  struct Scenario {
    const char* name;
    int blocks;
    int budget;
    int max_new;
    bool arriving;
  } scenarios[] = {
      {"decode", roomy_blocks, seqs, 256, false},
      {"mixed", roomy_blocks, seqs + 256, 64, true},
      {"preempt", seqs * (512 / 16 + 2), seqs + 256, 256, true},
  };
  std::printf("scheduler overhead per step, %d sequences, %d steps (block size 16)\n", seqs, steps);
  std::printf("%-8s %10s %10s %10s %14s %12s\n", "scenario", "mean_us", "p50_us", "p99_us",
              "tokens/step", "preemptions");
  for (const Scenario& s : scenarios) {
    moe::Result r = moe::Run(seqs, steps, s.blocks, s.budget, s.max_new, s.arriving);
    std::printf("%-8s %10.1f %10.1f %10.1f %14.1f %12lld\n", s.name, r.mean_us, r.p50_us, r.p99_us,
                r.tokens_per_step, static_cast<long long>(r.preemptions));
  }
  return 0;
}
