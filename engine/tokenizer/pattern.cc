#include "engine/tokenizer/pattern.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace moe::tokenizer_internal {

struct Pattern::Compiled {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Compiled() {
    if (code != nullptr) pcre2_code_free(code);
  }
};

namespace {

// Per-thread match state: a JIT stack large enough for long whitespace runs, and a match
// data block reused across calls.
struct ThreadMatchState {
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  pcre2_match_data* match_data = nullptr;
  ThreadMatchState() {
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    if (context != nullptr && jit_stack != nullptr) {
      pcre2_jit_stack_assign(context, nullptr, jit_stack);
    }
    match_data = pcre2_match_data_create(16, nullptr);
  }
  ~ThreadMatchState() {
    if (match_data != nullptr) pcre2_match_data_free(match_data);
    if (jit_stack != nullptr) pcre2_jit_stack_free(jit_stack);
    if (context != nullptr) pcre2_match_context_free(context);
  }
};

ThreadMatchState& MatchState() {
  thread_local ThreadMatchState state;
  return state;
}

std::string Pcre2Message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return std::string(reinterpret_cast<const char*>(buffer));
}

}  // namespace

Pattern::Pattern(Pattern&&) noexcept = default;
Pattern& Pattern::operator=(Pattern&&) noexcept = default;
Pattern::~Pattern() = default;

absl::StatusOr<Pattern> Pattern::Literal(std::string literal) {
  Pattern pattern;
  pattern.literal_ = std::move(literal);
  return pattern;
}

absl::StatusOr<Pattern> Pattern::Regex(std::string_view regex, std::string_view where) {
  Pattern pattern;
  pattern.literal_ = std::string(regex);
  pattern.compiled_ = std::make_unique<Compiled>();
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pattern.compiled_->code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(regex.data()), regex.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &error_code, &error_offset, nullptr);
  if (pattern.compiled_->code == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", Sv(where), ": regex '",
                                                   Sv(regex), "' does not compile at offset ",
                                                   error_offset, ": ", Pcre2Message(error_code)));
  }
  pattern.compiled_->jit = pcre2_jit_compile(pattern.compiled_->code, PCRE2_JIT_COMPLETE) == 0;
  return pattern;
}

absl::StatusOr<Pattern> Pattern::FromJson(const nlohmann::json& pattern, std::string_view where) {
  if (pattern.is_object() && pattern.size() == 1) {
    const auto string_it = pattern.find("String");
    if (string_it != pattern.end() && string_it->is_string()) {
      return Literal(string_it->get<std::string>());
    }
    const auto regex_it = pattern.find("Regex");
    if (regex_it != pattern.end() && regex_it->is_string()) {
      return Regex(regex_it->get<std::string>(), where);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "tokenizer.json: ", Sv(where),
      ": 'pattern' must be {\"String\": \"...\"} or {\"Regex\": \"...\"}, got ", pattern.dump()));
}

absl::Status Pattern::FindAll(std::string_view text, std::vector<Match>& matches) const {
  if (compiled_ == nullptr) {
    if (literal_.empty()) return absl::OkStatus();
    size_t pos = 0;
    while ((pos = text.find(literal_, pos)) != std::string_view::npos) {
      matches.push_back({pos, pos + literal_.size()});
      pos += literal_.size();
    }
    return absl::OkStatus();
  }
  ThreadMatchState& state = MatchState();
  pcre2_match_data* data = state.match_data;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  size_t last_end = static_cast<size_t>(-1);
  while (pos <= text.size()) {
    const int rc = compiled_->jit ? pcre2_jit_match(compiled_->code, subject, text.size(), pos, 0,
                                                    data, state.context)
                                  : pcre2_match(compiled_->code, subject, text.size(), pos,
                                                PCRE2_NO_UTF_CHECK, data, state.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("regex '", literal_, "' failed at byte ", pos, ": ", Pcre2Message(rc)));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
    const size_t start = ovector[0];
    const size_t end = ovector[1];
    if (start == end) {
      // An empty match right after the previous match is skipped (Rust semantics).
      if (start != last_end) matches.push_back({start, end});
      if (end >= text.size()) break;
      pos = end + Utf8SequenceLength(static_cast<uint8_t>(text[end]));
      continue;
    }
    matches.push_back({start, end});
    last_end = end;
    pos = end;
  }
  return absl::OkStatus();
}

absl::Status Pattern::ReplaceAll(std::string_view text, std::string_view content,
                                 std::string& out) const {
  std::vector<Match> matches;
  if (auto status = FindAll(text, matches); !status.ok()) return status;
  size_t last = 0;
  for (const Match& m : matches) {
    out.append(text.substr(last, m.start - last));
    out.append(content);
    last = m.end;
  }
  out.append(text.substr(last));
  return absl::OkStatus();
}

}  // namespace moe::tokenizer_internal
