// The packed ("varlen") batch of one engine step: tokens of many sequences, prefill chunks and
// decode tokens mixed, and what the forward pass returns for it.
#pragma once

#include <cstdint>
#include <vector>

namespace moe {

// The tokens one sequence contributes to a step: rows [token_begin, token_begin + num_tokens)
// of the packed arrays in ForwardBatch, at positions [context_len - num_tokens, context_len).
struct SequenceChunk {
  int64_t seq_id = 0;
  int32_t token_begin = 0;
  int32_t num_tokens = 0;
  // Tokens in this sequence's KV cache once this step has written its tokens.
  int32_t context_len = 0;
  // Physical KV block ids holding positions [0, context_len), in order:
  // position p lives in block block_table[p / block_size], offset p % block_size.
  std::vector<int32_t> block_table;
};

struct ForwardBatch {
  std::vector<int32_t> token_ids;     // [num_tokens]
  std::vector<int32_t> positions;     // [num_tokens]
  std::vector<int32_t> slot_mapping;  // [num_tokens] KV slot = block * block_size + offset
  std::vector<SequenceChunk> sequences;
  // Rows of the packed batch whose logits are needed (usually the last token of each sequence
  // that is decoding or finishes its prefill in this step), in the order logits are returned.
  std::vector<int32_t> logits_rows;
  // Empty, or one flag per logits row: true when the caller needs only the row's argmax
  // (greedy sampling that reads nothing else of the row). Such rows come back in
  // ForwardOutput::argmax, computed where the logits are, and their logits are not copied out.
  std::vector<bool> argmax_only;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  // Whether logits row i (an index into logits_rows) comes back in ForwardOutput::logits.
  bool returns_logits(size_t i) const { return argmax_only.empty() || !argmax_only[i]; }
};

// Exact routing of one step, for expert statistics and per-token routing in responses.
struct StepRouting {
  // For each MoE layer (in model order): [num_tokens * top_k] chosen expert ids and weights,
  // row-major by token.
  std::vector<std::vector<int32_t>> expert_ids;
  std::vector<std::vector<float>> expert_weights;
  // For each MoE layer: [num_experts] sum over the step's tokens of the router softmax
  // probability of each expert (for the Switch balance term), and the sum over tokens of
  // logsumexp(router logits)^2 (for the router z value).
  std::vector<std::vector<double>> probability_mass;
  std::vector<double> router_z_sum;
};

struct ForwardOutput {
  // [rows, vocab_size]: the logits rows that return logits (all unless argmax_only marks some),
  // in logits_rows order.
  std::vector<float> logits;
  // [logits_rows.size()]: every logits row's ArgMax (engine/common/argmax.h) when the batch
  // marks any row argmax_only; empty otherwise.
  std::vector<int32_t> argmax;
  StepRouting routing;
};

}  // namespace moe
