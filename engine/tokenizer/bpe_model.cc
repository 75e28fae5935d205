#include "engine/tokenizer/bpe_model.h"

#include <algorithm>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/json_util.h"
#include "engine/tokenizer/utf8.h"

namespace moe::tokenizer_internal {
namespace {

constexpr char kWhere[] = "model BPE";

struct Symbol {
  int32_t id;
  int32_t prev;
  int32_t next;
  uint32_t len;  // bytes of the original word it covers; 0 once merged away
};

struct QueuedMerge {
  uint32_t rank;
  int32_t pos;
  int32_t new_id;
};

// Heap order: lowest rank first, then leftmost position (Merge's Ord in word.rs).
struct LowerPriority {
  bool operator()(const QueuedMerge& a, const QueuedMerge& b) const {
    if (a.rank != b.rank) return a.rank > b.rank;
    return a.pos > b.pos;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const nlohmann::json& model) {
  if (!model.is_object()) return JsonError("model", "must be an object");
  const auto type_it = model.find("type");
  if (type_it != model.end() && !(type_it->is_string() && type_it->get<std::string>() == "BPE")) {
    return JsonError("model",
                     absl::StrCat("type ", type_it->dump(), " is not supported; supported: BPE"));
  }
  auto bpe = std::unique_ptr<BpeModel>(new BpeModel());
  const auto dropout = model.find("dropout");
  if (dropout != model.end() && !dropout->is_null() &&
      !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return JsonError(kWhere, absl::StrCat("dropout ", dropout->dump(),
                                          " is not supported at inference; supported: null"));
  }
  ASSIGN_OR_RETURN(bpe->unk_token_, GetOptionalString(model, "unk_token", kWhere));
  ASSIGN_OR_RETURN(auto prefix, GetOptionalString(model, "continuing_subword_prefix", kWhere));
  ASSIGN_OR_RETURN(auto suffix, GetOptionalString(model, "end_of_word_suffix", kWhere));
  bpe->continuing_subword_prefix_ = prefix.value_or("");
  bpe->end_of_word_suffix_ = suffix.value_or("");
  ASSIGN_OR_RETURN(bpe->fuse_unk_, GetBool(model, "fuse_unk", false, kWhere));
  ASSIGN_OR_RETURN(bpe->byte_fallback_, GetBool(model, "byte_fallback", false, kWhere));
  ASSIGN_OR_RETURN(bpe->ignore_merges_, GetBool(model, "ignore_merges", false, kWhere));

  const auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return JsonError(kWhere, "'vocab' must be an object of token -> id");
  }
  bpe->vocab_.reserve(vocab->size());
  int64_t max_id = -1;
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      return JsonError(kWhere, absl::StrCat("vocab id of '", token,
                                            "' must be a non-negative "
                                            "32-bit integer, got ",
                                            id.dump()));
    }
    RETURN_IF_ERROR(ValidateUtf8(token, "vocab token"));
    bpe->vocab_[token] = id.get<int32_t>();
    max_id = std::max<int64_t>(max_id, id.get<int64_t>());
  }
  if (max_id >= (int64_t{1} << 24) && max_id > static_cast<int64_t>(vocab->size()) * 4) {
    return JsonError(kWhere, absl::StrCat("vocab ids are too sparse (largest ", max_id, " for ",
                                          vocab->size(), " tokens)"));
  }
  bpe->id_to_token_.resize(max_id + 1);
  bpe->id_present_.assign(max_id + 1, false);
  for (const auto& [token, id] : bpe->vocab_) {
    bpe->id_to_token_[id] = token;
    bpe->id_present_[id] = true;
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = bpe->vocab_.find(absl::StrFormat("<0x%02X>", b));
    bpe->byte_ids_[b] = it == bpe->vocab_.end() ? -1 : it->second;
  }
  for (int c = 0; c < 128; ++c) {
    const std::string text(1, static_cast<char>(c));
    const auto it = bpe->vocab_.find(text);
    bpe->ascii_ids_[c] = it == bpe->vocab_.end() ? -1 : it->second;
  }

  const auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return JsonError(kWhere, "'merges' must be an array");
  }
  bpe->merges_.reserve(merges->size());
  const size_t prefix_len = bpe->continuing_subword_prefix_.size();
  uint32_t rank = 0;
  for (const auto& merge : *merges) {
    std::string left, right;
    if (merge.is_string()) {
      const std::string& text = merge.get_ref<const std::string&>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        return JsonError(kWhere, absl::StrCat("merge \"", text,
                                              "\" must be two tokens "
                                              "separated by one space"));
      }
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return JsonError(kWhere,
                       absl::StrCat("merge ", merge.dump(), " must be \"a b\" or [\"a\", \"b\"]"));
    }
    const auto left_it = bpe->vocab_.find(left);
    const auto right_it = bpe->vocab_.find(right);
    const std::string merged =
        left + (right.size() >= prefix_len ? right.substr(prefix_len) : std::string());
    const auto merged_it = bpe->vocab_.find(merged);
    for (const std::string* missing :
         std::initializer_list<const std::string*>{&left, &right, &merged}) {
      if (bpe->vocab_.find(*missing) == bpe->vocab_.end()) {
        return JsonError(kWhere, absl::StrCat("merge #", rank, " uses token '", *missing,
                                              "' that is not in the vocab"));
      }
    }
    // A repeated pair keeps its last rank, as in the reference (HashMap collect).
    bpe->merges_[PairKey(left_it->second, right_it->second)] = {rank, merged_it->second};
    ++rank;
  }
  bpe->cache_ = std::make_unique<CacheShard[]>(kCacheShards);
  return bpe;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  const auto it = vocab_.find(Sv(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= id_end() || !id_present_[id]) return nullptr;
  return &id_to_token_[id];
}

absl::Status BpeModel::Tokenize(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return absl::OkStatus();
  if (ignore_merges_) {
    if (const auto it = vocab_.find(Sv(word)); it != vocab_.end()) {
      ids.push_back(it->second);
      return absl::OkStatus();
    }
  }
  if (word.size() > kMaxCachedWordBytes) return MergeWord(word, ids);
  const size_t hash = absl::Hash<absl::string_view>()(Sv(word));
  CacheShard& shard = cache_[hash % kCacheShards];
  {
    absl::MutexLock lock(&shard.mutex);
    const auto it = shard.entries.find(Sv(word));
    if (it != shard.entries.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  const size_t first = ids.size();
  RETURN_IF_ERROR(MergeWord(word, ids));
  std::vector<int32_t> result(ids.begin() + first, ids.end());
  absl::MutexLock lock(&shard.mutex);
  if (shard.entries.size() >= kCacheEntriesPerShard) shard.entries.clear();
  shard.entries.emplace(std::string(word), std::move(result));
  return absl::OkStatus();
}

absl::Status BpeModel::MergeWord(std::string_view word, std::vector<int32_t>& ids) const {
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&symbols](int32_t id, uint32_t len) {
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, len});
    if (index > 0) symbols[index - 1].next = index;
  };
  int32_t unk_id = -1;  // pending unknown token (fused when fuse_unk)
  uint32_t unk_len = 0;
  std::string with_affixes;
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t start = pos;
    pos += Utf8SequenceLength(static_cast<uint8_t>(word[pos]));
    const bool is_first = start == 0;
    const bool is_last = pos >= word.size();
    std::string_view piece = word.substr(start, pos - start);
    const uint32_t byte_len = static_cast<uint32_t>(piece.size());
    const bool affixed = (!is_first && !continuing_subword_prefix_.empty()) ||
                         (is_last && !end_of_word_suffix_.empty());
    if (affixed) {
      with_affixes.clear();
      if (!is_first) with_affixes.append(continuing_subword_prefix_);
      with_affixes.append(piece);
      if (is_last) with_affixes.append(end_of_word_suffix_);
      piece = with_affixes;
    }
    int32_t id = -1;
    if (piece.size() == 1 && static_cast<uint8_t>(piece[0]) < 0x80) {
      id = ascii_ids_[static_cast<uint8_t>(piece[0])];
    } else if (const auto it = vocab_.find(Sv(piece)); it != vocab_.end()) {
      id = it->second;
    }
    if (id >= 0) {
      if (unk_id >= 0) {
        add(unk_id, unk_len);
        unk_id = -1;
      }
      add(id, byte_len);
      continue;
    }
    if (byte_fallback_) {
      bool all_bytes = true;
      for (char c : piece) all_bytes = all_bytes && byte_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all_bytes) {
        for (char c : piece) add(byte_ids_[static_cast<uint8_t>(c)], 1);
        continue;
      }
    }
    if (unk_token_.has_value()) {
      const auto unk_it = vocab_.find(*unk_token_);
      if (unk_it == vocab_.end()) {
        return absl::FailedPreconditionError(absl::StrCat("tokenizer.json: model BPE: unk_token '",
                                                          *unk_token_, "' is not in the vocab"));
      }
      if (unk_id >= 0 && fuse_unk_) {
        unk_len += byte_len;
      } else {
        if (unk_id >= 0) add(unk_id, unk_len);
        unk_id = unk_it->second;
        unk_len = byte_len;
      }
    }
  }
  if (unk_id >= 0) add(unk_id, unk_len);

  if (symbols.size() > 1 && !merges_.empty()) {
    std::vector<QueuedMerge> queue;
    queue.reserve(symbols.size());
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const auto it = merges_.find(PairKey(symbols[i].id, symbols[i + 1].id));
      if (it != merges_.end()) {
        queue.push_back({it->second.rank, static_cast<int32_t>(i), it->second.new_id});
      }
    }
    std::make_heap(queue.begin(), queue.end(), LowerPriority());
    while (!queue.empty()) {
      std::pop_heap(queue.begin(), queue.end(), LowerPriority());
      const QueuedMerge top = queue.back();
      queue.pop_back();
      Symbol& current = symbols[top.pos];
      if (current.len == 0 || current.next == -1) continue;
      const int32_t next_pos = current.next;
      const Symbol right = symbols[next_pos];
      const auto check = merges_.find(PairKey(current.id, right.id));
      if (check == merges_.end() || check->second.new_id != top.new_id) continue;  // stale
      current.id = top.new_id;
      current.len += right.len;
      current.next = right.next;
      symbols[next_pos].len = 0;
      if (right.next >= 0) symbols[right.next].prev = top.pos;
      if (current.prev >= 0) {
        const auto it = merges_.find(PairKey(symbols[current.prev].id, current.id));
        if (it != merges_.end()) {
          queue.push_back({it->second.rank, current.prev, it->second.new_id});
          std::push_heap(queue.begin(), queue.end(), LowerPriority());
        }
      }
      if (current.next >= 0) {
        const auto it = merges_.find(PairKey(current.id, symbols[current.next].id));
        if (it != merges_.end()) {
          queue.push_back({it->second.rank, top.pos, it->second.new_id});
          std::push_heap(queue.begin(), queue.end(), LowerPriority());
        }
      }
    }
  }
  for (const Symbol& symbol : symbols) {
    if (symbol.len != 0) ids.push_back(symbol.id);
  }
  return absl::OkStatus();
}

}  // namespace moe::tokenizer_internal
