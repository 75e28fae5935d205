// Lexer and parser of the chat-template Jinja subset. Mirrors jinja2 3.1's lexer.py (with
// trim_blocks and lstrip_blocks on) and parser.py: same token rules, whitespace control,
// operator precedence and statement grammar, so a template means here what it means to
// transformers.
#include <utf8proc.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/chat_template_internal.h"

namespace moe::chat_template_internal {
namespace {

// Nesting of expressions and blocks the parser accepts; deeper input is refused rather than
// recursed into (the parser and evaluator recurse per level).
constexpr int kMaxParseDepth = 200;

// ---------------------------------------------------------------------------------------
// Lexer.

struct Token {
  enum class Kind {
    kText,
    kVariableBegin,
    kVariableEnd,
    kBlockBegin,
    kBlockEnd,
    kName,
    kString,
    kInteger,
    kFloat,
    kOperator,
    kEnd,
  };
  Kind kind;
  SourcePos pos;
  std::string value;  // text, name, operator, decoded string
  int64_t integer = 0;
  double number = 0;
};

std::string Describe(const Token& token) {
  switch (token.kind) {
    case Token::Kind::kText:
      return "template data";
    case Token::Kind::kVariableBegin:
      return "begin of print statement";
    case Token::Kind::kVariableEnd:
      return "end of print statement";
    case Token::Kind::kBlockBegin:
      return "begin of statement block";
    case Token::Kind::kBlockEnd:
      return "end of statement block";
    case Token::Kind::kName:
    case Token::Kind::kOperator:
      return token.value;
    case Token::Kind::kString:
      return "string";
    case Token::Kind::kInteger:
      return "integer";
    case Token::Kind::kFloat:
      return "float";
    case Token::Kind::kEnd:
      return "end of template";
  }
  return "token";
}

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsNameStart(char c) { return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsNameChar(char c) { return IsNameStart(c) || IsDigit(c); }

// Length of the Python whitespace code point at `text[pos]`, or 0.
size_t SpaceLength(std::string_view text, size_t pos) {
  if (pos >= text.size()) return 0;
  size_t next = pos;
  const char32_t c = NextCodePoint(text, next);
  return IsPythonSpace(c) ? next - pos : 0;
}

size_t SkipSpaces(std::string_view text, size_t pos) {
  while (size_t n = SpaceLength(text, pos)) pos += n;
  return pos;
}

// Python's str.rstrip() (no argument).
std::string_view RstripSpaces(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    if (SpaceLength(text, start) != end - start) break;
    end = start;
  }
  return text.substr(0, end);
}

bool AllSpaces(std::string_view text) {
  return !text.empty() && SkipSpaces(text, 0) == text.size();
}

class Lexer {
 public:
  explicit Lexer(std::string_view source) : source_(source) {}

  absl::StatusOr<std::vector<Token>> Run() {
    while (pos_ < source_.size()) {
      const size_t tag = FindTagStart(pos_);
      std::string_view text = source_.substr(pos_, tag - pos_);
      if (tag == source_.size()) {
        EmitText(text, pos_);
        pos_ = tag;
        break;
      }
      const char type = source_[tag + 1];
      size_t after = tag + 2;
      char sign = 0;
      if (after < source_.size() && (source_[after] == '-' || source_[after] == '+')) {
        sign = source_[after++];
      }
      if (sign == '-') {
        text = RstripSpaces(text);
      } else if (sign != '+' && type != '{') {
        // lstrip_blocks: spaces between the start of the line and a block or comment tag.
        const size_t newline = text.rfind('\n');
        const size_t line_start = newline == std::string_view::npos ? 0 : newline + 1;
        if ((line_start > 0 || line_starting_) && AllSpaces(text.substr(line_start))) {
          text = text.substr(0, line_start);
        }
      }
      EmitText(text, pos_);
      if (type == '#') {
        RETURN_IF_ERROR(SkipComment(tag, after));
      } else {
        RETURN_IF_ERROR(LexTag(tag, after, type == '{'));
      }
    }
    tokens_.push_back(Token{Token::Kind::kEnd, PosAt(source_.size()), {}});
    return std::move(tokens_);
  }

 private:
  SourcePos PosAt(size_t offset) {
    // Positions are requested in increasing order: advance a cursor.
    for (; cursor_ < offset && cursor_ < source_.size(); ++cursor_) {
      if (source_[cursor_] == '\n') {
        ++cursor_pos_.line;
        cursor_pos_.column = 1;
      } else if ((static_cast<uint8_t>(source_[cursor_]) & 0xC0) != 0x80) {
        ++cursor_pos_.column;
      }
    }
    return cursor_pos_;
  }

  size_t FindTagStart(size_t from) const {
    for (size_t i = from; i + 1 < source_.size(); ++i) {
      if (source_[i] == '{' &&
          (source_[i + 1] == '{' || source_[i + 1] == '%' || source_[i + 1] == '#')) {
        return i;
      }
    }
    return source_.size();
  }

  void EmitText(std::string_view text, size_t offset) {
    if (text.empty()) return;
    tokens_.push_back(Token{Token::Kind::kText, PosAt(offset), std::string(text)});
  }

  // After a block or comment end: `-` strips all following whitespace, `+` keeps it, and
  // otherwise trim_blocks removes one newline.
  size_t AfterBlockEnd(size_t end, char sign) {
    size_t next = end;
    if (sign == '-') {
      next = SkipSpaces(source_, end);
    } else if (sign != '+' && end < source_.size() && source_[end] == '\n') {
      next = end + 1;
    }
    line_starting_ = next > 0 && source_[next - 1] == '\n';
    return next;
  }

  absl::Status SkipComment(size_t tag, size_t body) {
    const size_t close = source_.find("#}", body);
    if (close == std::string_view::npos) {
      return ErrorAt(PosAt(tag), "Missing end of comment tag");
    }
    const char sign = close > body ? source_[close - 1] : 0;
    pos_ = AfterBlockEnd(close + 2, sign == '-' || sign == '+' ? sign : 0);
    return absl::OkStatus();
  }

  absl::Status LexTag(size_t tag, size_t pos, bool variable) {
    tokens_.push_back(
        Token{variable ? Token::Kind::kVariableBegin : Token::Kind::kBlockBegin, PosAt(tag), {}});
    std::vector<char> brackets;  // closers expected, innermost last
    while (true) {
      // The end of the tag counts only when brackets are balanced, as in jinja2.
      if (brackets.empty()) {
        if (variable) {
          if (source_.substr(pos, 3) == "-}}") {
            tokens_.push_back(Token{Token::Kind::kVariableEnd, PosAt(pos), {}});
            pos_ = SkipSpaces(source_, pos + 3);
            line_starting_ = pos_ > 0 && source_[pos_ - 1] == '\n';
            return absl::OkStatus();
          }
          if (source_.substr(pos, 2) == "}}") {
            tokens_.push_back(Token{Token::Kind::kVariableEnd, PosAt(pos), {}});
            pos_ = pos + 2;
            line_starting_ = false;
            return absl::OkStatus();
          }
        } else {
          const bool signed_end =
              source_.substr(pos, 3) == "-%}" || source_.substr(pos, 3) == "+%}";
          if (signed_end || source_.substr(pos, 2) == "%}") {
            tokens_.push_back(Token{Token::Kind::kBlockEnd, PosAt(pos), {}});
            pos_ = signed_end ? AfterBlockEnd(pos + 3, source_[pos]) : AfterBlockEnd(pos + 2, 0);
            return absl::OkStatus();
          }
        }
      }
      if (size_t space = SpaceLength(source_, pos)) {
        pos += space;
        continue;
      }
      if (pos >= source_.size()) {
        // jinja2's lexer stops here too; the parser reports the missing end.
        pos_ = pos;
        return absl::OkStatus();
      }
      const char c = source_[pos];
      if (IsDigit(c)) {
        ASSIGN_OR_RETURN(pos, LexNumber(pos));
      } else if (IsNameStart(c)) {
        size_t end = pos;
        while (end < source_.size() && IsNameChar(source_[end])) ++end;
        tokens_.push_back(
            Token{Token::Kind::kName, PosAt(pos), std::string(source_.substr(pos, end - pos))});
        pos = end;
      } else if (c == '\'' || c == '"') {
        ASSIGN_OR_RETURN(pos, LexString(pos));
      } else {
        ASSIGN_OR_RETURN(pos, LexOperator(pos, brackets));
      }
    }
  }

  // jinja2's float_re and integer_re (underscores between digits, 0b/0o/0x prefixes).
  absl::StatusOr<size_t> LexNumber(size_t start) {
    auto digits = [&](size_t p) {  // (\d+_)*\d+ ; returns the end or p when none
      size_t end = p;
      while (end < source_.size() && IsDigit(source_[end])) {
        while (end < source_.size() && IsDigit(source_[end])) ++end;
        if (end + 1 < source_.size() && source_[end] == '_' && IsDigit(source_[end + 1])) ++end;
      }
      return end;
    };
    const bool after_dot = start > 0 && source_[start - 1] == '.';
    const size_t int_end = digits(start);
    size_t float_end = int_end;
    if (!after_dot) {
      size_t p = int_end;
      bool fraction = false;
      if (p + 1 < source_.size() && source_[p] == '.' && IsDigit(source_[p + 1])) {
        p = digits(p + 1);
        fraction = true;
      }
      size_t exponent = p;
      if (exponent < source_.size() && (source_[exponent] == 'e' || source_[exponent] == 'E')) {
        ++exponent;
        if (exponent < source_.size() && (source_[exponent] == '+' || source_[exponent] == '-'))
          ++exponent;
        const size_t exponent_end = digits(exponent);
        if (exponent_end > exponent)
          p = exponent_end;
        else
          exponent = 0;
      } else {
        exponent = 0;
      }
      if (fraction || exponent != 0) float_end = p;
    }
    std::string cleaned;
    if (float_end > int_end) {
      for (char ch : source_.substr(start, float_end - start)) {
        if (ch != '_') cleaned += ch;
      }
      Token token{Token::Kind::kFloat, PosAt(start), {}};
      token.number = std::strtod(cleaned.c_str(), nullptr);
      tokens_.push_back(std::move(token));
      return float_end;
    }
    int base = 10;
    size_t p = start;
    size_t end = int_end;
    if (source_[start] == '0' && start + 1 < source_.size()) {
      const char prefix = static_cast<char>(source_[start + 1] | 0x20);
      if (prefix == 'b' || prefix == 'o' || prefix == 'x') {
        base = prefix == 'b' ? 2 : prefix == 'o' ? 8 : 16;
        p = start + 2;
        end = p;
        auto is_base_digit = [&](char ch) {
          if (base == 16) return IsDigit(ch) || ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'f');
          return ch >= '0' && ch < '0' + base;
        };
        while (end < source_.size()) {
          if (is_base_digit(source_[end])) {
            ++end;
          } else if (source_[end] == '_' && end + 1 < source_.size() &&
                     is_base_digit(source_[end + 1])) {
            end += 2;
          } else {
            break;
          }
        }
        if (end == p) {  // "0x" alone: the integer 0 followed by a name
          p = start;
          end = start + 1;
          base = 10;
        }
      } else {
        // 0(_?0)*: a decimal literal does not start with 0 unless it is zero.
        end = start + 1;
        while (end < source_.size() &&
               (source_[end] == '0' ||
                (source_[end] == '_' && end + 1 < source_.size() && source_[end + 1] == '0'))) {
          end += source_[end] == '_' ? 2 : 1;
        }
      }
    }
    uint64_t value = 0;
    for (size_t i = p; i < end; ++i) {
      const char ch = source_[i];
      if (ch == '_') continue;
      const int digit = IsDigit(ch) ? ch - '0' : (ch | 0x20) - 'a' + 10;
      if (value > (static_cast<uint64_t>(INT64_MAX) - digit) / base) {
        return ErrorAt(PosAt(start), "integer literal too large");
      }
      value = value * base + digit;
    }
    Token token{Token::Kind::kInteger, PosAt(start), {}};
    token.integer = static_cast<int64_t>(value);
    tokens_.push_back(std::move(token));
    return end;
  }

  // A quoted string with Python's escapes (jinja2 decodes with "unicode-escape").
  absl::StatusOr<size_t> LexString(size_t start) {
    const char quote = source_[start];
    size_t end = start + 1;
    while (end < source_.size() && source_[end] != quote) {
      end += source_[end] == '\\' ? 2 : 1;
    }
    if (end >= source_.size()) {
      return ErrorAt(PosAt(start), absl::StrCat("unexpected char '", std::string(1, quote), "'"));
    }
    const SourcePos pos = PosAt(start);
    std::string value;
    for (size_t i = start + 1; i < end; ++i) {
      const char c = source_[i];
      if (c != '\\') {
        value += c;
        continue;
      }
      const char e = source_[++i];
      auto hex = [&](int count) -> absl::StatusOr<char32_t> {
        char32_t cp = 0;
        for (int k = 0; k < count; ++k) {
          const size_t at = i + 1 + k;
          const char h = at < end ? static_cast<char>(source_[at] | 0x20) : 0;
          if (!IsDigit(h) && !(h >= 'a' && h <= 'f')) {
            return ErrorAt(pos, absl::StrCat("truncated \\", std::string(1, e), " escape"));
          }
          cp = cp * 16 + (IsDigit(h) ? h - '0' : h - 'a' + 10);
        }
        i += count;
        return cp;
      };
      char32_t cp = 0;
      switch (e) {
        case '\n':
          continue;  // line continuation
        case '\\':
          cp = '\\';
          break;
        case '\'':
          cp = '\'';
          break;
        case '"':
          cp = '"';
          break;
        case 'a':
          cp = 7;
          break;
        case 'b':
          cp = 8;
          break;
        case 'f':
          cp = 12;
          break;
        case 'n':
          cp = 10;
          break;
        case 'r':
          cp = 13;
          break;
        case 't':
          cp = 9;
          break;
        case 'v':
          cp = 11;
          break;
        case 'x': {
          ASSIGN_OR_RETURN(cp, hex(2));
          break;
        }
        case 'u': {
          ASSIGN_OR_RETURN(cp, hex(4));
          break;
        }
        case 'U': {
          ASSIGN_OR_RETURN(cp, hex(8));
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            cp = e - '0';
            for (int k = 0; k < 2 && i + 1 < end && source_[i + 1] >= '0' && source_[i + 1] <= '7';
                 ++k) {
              cp = cp * 8 + (source_[++i] - '0');
            }
          } else {
            value += '\\';  // unknown escapes stay as written
            value += e;
            continue;
          }
      }
      if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        // Python would build a string it cannot encode; refuse up front.
        return ErrorAt(pos, "string escape is not a valid code point");
      }
      AppendUtf8(cp, value);
    }
    tokens_.push_back(Token{Token::Kind::kString, pos, std::move(value)});
    return end + 1;
  }

  absl::StatusOr<size_t> LexOperator(size_t start, std::vector<char>& brackets) {
    static constexpr std::string_view kTwoChar[] = {"//", "**", "==", "!=", ">=", "<="};
    static constexpr std::string_view kOneChar = "+-/*%~[](){}<>=.:|,;";
    std::string_view op;
    for (std::string_view candidate : kTwoChar) {
      if (source_.substr(start, 2) == candidate) op = candidate;
    }
    if (op.empty() && kOneChar.find(source_[start]) != std::string_view::npos) {
      op = source_.substr(start, 1);
    }
    if (op.empty()) {
      size_t next = start;
      NextCodePoint(source_, next);
      return ErrorAt(PosAt(start), absl::StrCat("unexpected char '",
                                                Sv(source_.substr(start, next - start)), "'"));
    }
    const char c = op[0];
    if (op.size() == 1 && (c == '(' || c == '[' || c == '{')) {
      brackets.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
    } else if (op.size() == 1 && (c == ')' || c == ']' || c == '}')) {
      if (brackets.empty()) return ErrorAt(PosAt(start), absl::StrCat("unexpected '", Sv(op), "'"));
      if (brackets.back() != c) {
        return ErrorAt(PosAt(start), absl::StrCat("unexpected '", Sv(op), "', expected '",
                                                  std::string(1, brackets.back()), "'"));
      }
      brackets.pop_back();
    }
    tokens_.push_back(Token{Token::Kind::kOperator, PosAt(start), std::string(op)});
    return start + op.size();
  }

  std::string_view source_;
  size_t pos_ = 0;
  bool line_starting_ = true;
  std::vector<Token> tokens_;
  size_t cursor_ = 0;
  SourcePos cursor_pos_;
};

// ---------------------------------------------------------------------------------------
// Parser: jinja2's recursive descent, one method per grammar rule of parser.py.

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  absl::StatusOr<std::unique_ptr<Program>> Run() {
    auto program = std::make_unique<Program>();
    ASSIGN_OR_RETURN(program->body, ParseBody({}, ""));
    return program;
  }

 private:
  const Token& Current() const { return tokens_[index_]; }
  const Token& Peek() const { return tokens_[std::min(index_ + 1, tokens_.size() - 1)]; }
  void Advance() {
    if (index_ + 1 < tokens_.size()) ++index_;
  }
  bool IsName(std::string_view name) const {
    return Current().kind == Token::Kind::kName && Current().value == name;
  }
  bool IsOp(std::string_view op) const {
    return Current().kind == Token::Kind::kOperator && Current().value == op;
  }
  bool SkipName(std::string_view name) {
    if (!IsName(name)) return false;
    Advance();
    return true;
  }
  bool SkipOp(std::string_view op) {
    if (!IsOp(op)) return false;
    Advance();
    return true;
  }

  absl::Status Fail(std::string_view message) const { return ErrorAt(Current().pos, message); }

  absl::Status Expected(std::string_view what) const {
    if (Current().kind == Token::Kind::kEnd) {
      return Fail(absl::StrCat("unexpected end of template, expected '", Sv(what), "'."));
    }
    return Fail(absl::StrCat("expected token '", Sv(what), "', got '", Describe(Current()), "'"));
  }

  absl::Status ExpectOp(std::string_view op) {
    if (!SkipOp(op)) return Expected(op);
    return absl::OkStatus();
  }

  absl::Status ExpectBlockEnd() {
    if (Current().kind != Token::Kind::kBlockEnd) return Expected("end of statement block");
    Advance();
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> ExpectName() {
    if (Current().kind != Token::Kind::kName) return Expected("name");
    std::string name = Current().value;
    Advance();
    return name;
  }

  // Counts nesting so that hostile input cannot recurse the parser off the stack.
  class DepthGuard {
   public:
    explicit DepthGuard(Parser& parser) : parser_(parser) { ++parser_.depth_; }
    ~DepthGuard() { --parser_.depth_; }
    absl::Status Check() const {
      if (parser_.depth_ > kMaxParseDepth) return parser_.Fail("template nesting too deep");
      return absl::OkStatus();
    }

   private:
    Parser& parser_;
  };

  // Statements until a block tag named in `end_tags` (left current, after `{%`) or the end
  // of the template (only allowed at top level, `end_tags` empty).
  absl::StatusOr<Body> ParseBody(const std::vector<std::string_view>& end_tags,
                                 std::string_view block) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    Body body;
    while (true) {
      const Token& token = Current();
      switch (token.kind) {
        case Token::Kind::kText: {
          auto stmt = NewStmt(Stmt::Kind::kText);
          stmt->text = token.value;
          body.push_back(std::move(stmt));
          Advance();
          break;
        }
        case Token::Kind::kVariableBegin: {
          auto stmt = NewStmt(Stmt::Kind::kOutput);
          Advance();
          ASSIGN_OR_RETURN(stmt->expr, ParseTuple(/*with_condition=*/true, {}, false));
          if (Current().kind != Token::Kind::kVariableEnd)
            return Expected("end of print statement");
          Advance();
          body.push_back(std::move(stmt));
          break;
        }
        case Token::Kind::kBlockBegin: {
          Advance();
          for (std::string_view end : end_tags) {
            if (IsName(end)) return body;
          }
          ASSIGN_OR_RETURN(auto stmt, ParseStatement());
          body.push_back(std::move(stmt));
          break;
        }
        case Token::Kind::kEnd: {
          if (end_tags.empty()) return body;
          std::string expected;
          for (size_t i = 0; i < end_tags.size(); ++i) {
            absl::StrAppend(&expected, i == 0 ? "" : " or ", "'", Sv(end_tags[i]), "'");
          }
          return Fail(absl::StrCat(
              "Unexpected end of template. Jinja was looking for the following tags: ", expected,
              ". The innermost block that needs to be closed is '", Sv(block), "'."));
        }
        default:
          return Fail(absl::StrCat("unexpected '", Describe(token), "'"));
      }
    }
  }

  std::unique_ptr<Stmt> NewStmt(Stmt::Kind kind) const {
    auto stmt = std::make_unique<Stmt>();
    stmt->kind = kind;
    stmt->pos = Current().pos;
    return stmt;
  }

  // Current token is the statement's name (after `{%`).
  absl::StatusOr<std::unique_ptr<Stmt>> ParseStatement() {
    if (Current().kind != Token::Kind::kName) return Fail("tag name expected");
    const std::string tag = Current().value;
    if (tag == "if") return ParseIf();
    if (tag == "for") return ParseFor();
    if (tag == "set") return ParseSet();
    if (tag == "macro") return ParseMacro();
    if (tag == "generation") {
      auto stmt = NewStmt(Stmt::Kind::kGeneration);
      Advance();
      RETURN_IF_ERROR(ExpectBlockEnd());
      ASSIGN_OR_RETURN(stmt->body, ParseBodyUntil("endgeneration", "generation"));
      return stmt;
    }
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) return Fail(absl::StrCat("'", tag, "' outside of a loop"));
      auto stmt = NewStmt(tag == "break" ? Stmt::Kind::kBreak : Stmt::Kind::kContinue);
      Advance();
      RETURN_IF_ERROR(ExpectBlockEnd());
      return stmt;
    }
    return Fail(absl::StrCat("Encountered unknown tag '", tag, "'."));
  }

  // A body closed by `{% end_tag %}`, which is consumed.
  absl::StatusOr<Body> ParseBodyUntil(std::string_view end_tag, std::string_view block) {
    ASSIGN_OR_RETURN(Body body, ParseBody({end_tag}, block));
    Advance();  // the end tag's name
    RETURN_IF_ERROR(ExpectBlockEnd());
    return body;
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseIf() {
    auto stmt = NewStmt(Stmt::Kind::kIf);
    Advance();
    while (true) {
      ASSIGN_OR_RETURN(ExprPtr condition, ParseTuple(/*with_condition=*/false, {}, false));
      RETURN_IF_ERROR(ExpectBlockEnd());
      ASSIGN_OR_RETURN(Body body, ParseBody({"elif", "else", "endif"}, "if"));
      stmt->branches.emplace_back(std::move(condition), std::move(body));
      if (SkipName("elif")) continue;
      if (SkipName("else")) {
        RETURN_IF_ERROR(ExpectBlockEnd());
        ASSIGN_OR_RETURN(stmt->else_body, ParseBodyUntil("endif", "if"));
        return stmt;
      }
      Advance();  // endif
      RETURN_IF_ERROR(ExpectBlockEnd());
      return stmt;
    }
  }

  // Assignment targets: a name or a tuple of names (`k, v` or `(k, v)`).
  absl::Status ParseTargets(Stmt& stmt, std::string_view end_name) {
    const bool parenthesized = SkipOp("(");
    while (true) {
      if (Current().kind != Token::Kind::kName) return Fail("can't assign to this expression");
      stmt.targets.push_back(Current().value);
      Advance();
      if (!SkipOp(",")) break;
      stmt.unpack = true;
      if ((parenthesized && IsOp(")")) || IsName(end_name) || IsOp("=")) break;
    }
    if (parenthesized) {
      stmt.unpack = true;
      RETURN_IF_ERROR(ExpectOp(")"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseFor() {
    auto stmt = NewStmt(Stmt::Kind::kFor);
    Advance();
    RETURN_IF_ERROR(ParseTargets(*stmt, "in"));
    if (!SkipName("in")) return Expected("in");
    ASSIGN_OR_RETURN(stmt->expr, ParseTuple(/*with_condition=*/false, {"recursive"}, false));
    if (SkipName("if")) {
      ASSIGN_OR_RETURN(stmt->condition, ParseExpression(true));
    }
    if (IsName("recursive")) return Fail("recursive for loops are not supported");
    RETURN_IF_ERROR(ExpectBlockEnd());
    ++loop_depth_;
    auto body = ParseBody({"endfor", "else"}, "for");
    --loop_depth_;
    if (!body.ok()) return body.status();
    stmt->body = std::move(body).value();
    if (SkipName("else")) {
      RETURN_IF_ERROR(ExpectBlockEnd());
      ASSIGN_OR_RETURN(stmt->else_body, ParseBodyUntil("endfor", "for"));
    } else {
      Advance();  // endfor
      RETURN_IF_ERROR(ExpectBlockEnd());
    }
    return stmt;
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseSet() {
    auto stmt = NewStmt(Stmt::Kind::kSet);
    Advance();
    if (Current().kind == Token::Kind::kName && Peek().kind == Token::Kind::kOperator &&
        Peek().value == ".") {
      stmt->kind = Stmt::Kind::kSetAttr;
      stmt->targets.push_back(Current().value);
      Advance();
      Advance();
      ASSIGN_OR_RETURN(stmt->text, ExpectName());
      RETURN_IF_ERROR(ExpectOp("="));
      ASSIGN_OR_RETURN(stmt->expr, ParseTuple(/*with_condition=*/true, {}, false));
      RETURN_IF_ERROR(ExpectBlockEnd());
      return stmt;
    }
    RETURN_IF_ERROR(ParseTargets(*stmt, ""));
    if (SkipOp("=")) {
      ASSIGN_OR_RETURN(stmt->expr, ParseTuple(/*with_condition=*/true, {}, false));
      RETURN_IF_ERROR(ExpectBlockEnd());
      return stmt;
    }
    if (stmt->unpack) return Fail("can't assign a block to a tuple");
    if (IsOp("|")) return Fail("filters on set blocks are not supported");
    stmt->kind = Stmt::Kind::kSetBlock;
    RETURN_IF_ERROR(ExpectBlockEnd());
    ASSIGN_OR_RETURN(stmt->body, ParseBodyUntil("endset", "set"));
    return stmt;
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseMacro() {
    auto stmt = NewStmt(Stmt::Kind::kMacro);
    Advance();
    ASSIGN_OR_RETURN(stmt->text, ExpectName());
    RETURN_IF_ERROR(ExpectOp("("));
    while (!SkipOp(")")) {
      if (!stmt->params.empty()) RETURN_IF_ERROR(ExpectOp(","));
      if (SkipOp(")")) break;  // trailing comma
      MacroParam param;
      ASSIGN_OR_RETURN(param.name, ExpectName());
      if (SkipOp("=")) {
        ASSIGN_OR_RETURN(param.default_value, ParseExpression(true));
      } else if (!stmt->params.empty() && stmt->params.back().default_value != nullptr) {
        return Fail("non-default argument follows default argument");
      }
      stmt->params.push_back(std::move(param));
    }
    RETURN_IF_ERROR(ExpectBlockEnd());
    // A macro body is a function: break/continue there do not reach an enclosing loop.
    const int saved_loop_depth = loop_depth_;
    loop_depth_ = 0;
    auto body = ParseBodyUntil("endmacro", "macro");
    loop_depth_ = saved_loop_depth;
    if (!body.ok()) return body.status();
    stmt->body = std::move(body).value();
    return stmt;
  }

  // ----- expressions ------------------------------------------------------------------

  ExprPtr NewExpr(Expr::Kind kind, SourcePos pos) const {
    auto expr = std::make_unique<Expr>();
    expr->kind = kind;
    expr->pos = pos;
    return expr;
  }

  ExprPtr Wrap(Expr::Kind kind, SourcePos pos, ExprPtr a, ExprPtr b = nullptr) const {
    ExprPtr expr = NewExpr(kind, pos);
    expr->operands.push_back(std::move(a));
    if (b != nullptr) expr->operands.push_back(std::move(b));
    return expr;
  }

  // Comma-separated expressions: a tuple when there is a comma (or explicit parentheses
  // around nothing), else the single expression.
  absl::StatusOr<ExprPtr> ParseTuple(bool with_condition,
                                     const std::vector<std::string_view>& extra_end,
                                     bool explicit_parentheses) {
    const SourcePos pos = Current().pos;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    auto at_end = [&] {
      const Token& t = Current();
      if (t.kind == Token::Kind::kVariableEnd || t.kind == Token::Kind::kBlockEnd ||
          t.kind == Token::Kind::kEnd)
        return true;
      if (IsOp(")")) return true;
      for (std::string_view name : extra_end) {
        if (IsName(name)) return true;
      }
      return false;
    };
    while (true) {
      if (!items.empty()) {
        if (!SkipOp(",")) break;
        is_tuple = true;
      }
      if (at_end()) break;
      ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(with_condition));
      items.push_back(std::move(item));
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items.front());
      if (!explicit_parentheses) {
        return Fail(absl::StrCat("Expected an expression, got '", Describe(Current()), "'"));
      }
    }
    ExprPtr tuple = NewExpr(Expr::Kind::kTuple, pos);
    tuple->operands = std::move(items);
    return tuple;
  }

  absl::StatusOr<ExprPtr> ParseExpression(bool with_condition) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    if (!with_condition) return ParseOr();
    ASSIGN_OR_RETURN(ExprPtr expr, ParseOr());
    while (IsName("if")) {
      const SourcePos pos = Current().pos;
      Advance();
      ASSIGN_OR_RETURN(ExprPtr condition, ParseOr());
      ExprPtr otherwise;
      if (SkipName("else")) {
        ASSIGN_OR_RETURN(otherwise, ParseExpression(true));
      }
      ExprPtr node = NewExpr(Expr::Kind::kCondition, pos);
      node->operands.push_back(std::move(condition));
      node->operands.push_back(std::move(expr));
      node->operands.push_back(std::move(otherwise));
      expr = std::move(node);
    }
    return expr;
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    ASSIGN_OR_RETURN(ExprPtr left, ParseAnd());
    while (IsName("or")) {
      const SourcePos pos = Current().pos;
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParseAnd());
      left = Wrap(Expr::Kind::kOr, pos, std::move(left), std::move(right));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseAnd() {
    ASSIGN_OR_RETURN(ExprPtr left, ParseNot());
    while (IsName("and")) {
      const SourcePos pos = Current().pos;
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParseNot());
      left = Wrap(Expr::Kind::kAnd, pos, std::move(left), std::move(right));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseNot() {
    if (IsName("not")) {
      DepthGuard guard(*this);
      RETURN_IF_ERROR(guard.Check());
      const SourcePos pos = Current().pos;
      Advance();
      ASSIGN_OR_RETURN(ExprPtr operand, ParseNot());
      return Wrap(Expr::Kind::kNot, pos, std::move(operand));
    }
    return ParseCompare();
  }

  absl::StatusOr<ExprPtr> ParseCompare() {
    const SourcePos pos = Current().pos;
    ASSIGN_OR_RETURN(ExprPtr first, ParseMath1());
    ExprPtr compare = NewExpr(Expr::Kind::kCompare, pos);
    compare->operands.push_back(std::move(first));
    while (true) {
      static constexpr std::pair<std::string_view, CompareOp> kOps[] = {
          {"==", CompareOp::kEq}, {"!=", CompareOp::kNe}, {"<", CompareOp::kLt},
          {"<=", CompareOp::kLe}, {">", CompareOp::kGt},  {">=", CompareOp::kGe}};
      std::optional<CompareOp> op;
      for (const auto& [text, value] : kOps) {
        if (IsOp(text)) op = value;
      }
      if (op.has_value()) {
        Advance();
      } else if (IsName("in")) {
        Advance();
        op = CompareOp::kIn;
      } else if (IsName("not") && Peek().kind == Token::Kind::kName && Peek().value == "in") {
        Advance();
        Advance();
        op = CompareOp::kNotIn;
      } else {
        break;
      }
      ASSIGN_OR_RETURN(ExprPtr operand, ParseMath1());
      compare->compare_ops.push_back(*op);
      compare->operands.push_back(std::move(operand));
    }
    if (compare->compare_ops.empty()) return std::move(compare->operands.front());
    return compare;
  }

  absl::StatusOr<ExprPtr> ParseBinaryLevel(
      const std::vector<std::pair<std::string_view, BinaryOp>>& ops,
      absl::StatusOr<ExprPtr> (Parser::*next)()) {
    ASSIGN_OR_RETURN(ExprPtr left, (this->*next)());
    while (true) {
      const BinaryOp* matched = nullptr;
      for (const auto& [text, op] : ops) {
        if (IsOp(text)) matched = &op;
      }
      if (matched == nullptr) return left;
      const SourcePos pos = Current().pos;
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, (this->*next)());
      left = Wrap(Expr::Kind::kBinary, pos, std::move(left), std::move(right));
      left->binary_op = *matched;
    }
  }

  // jinja2's levels, loosest first: + -, ~, * / // %, ** (left-associative in jinja2).
  absl::StatusOr<ExprPtr> ParseMath1() {
    return ParseBinaryLevel({{"+", BinaryOp::kAdd}, {"-", BinaryOp::kSub}}, &Parser::ParseConcat);
  }
  absl::StatusOr<ExprPtr> ParseConcat() {
    return ParseBinaryLevel({{"~", BinaryOp::kConcat}}, &Parser::ParseMath2);
  }
  absl::StatusOr<ExprPtr> ParseMath2() {
    return ParseBinaryLevel({{"*", BinaryOp::kMul},
                             {"/", BinaryOp::kDiv},
                             {"//", BinaryOp::kFloorDiv},
                             {"%", BinaryOp::kMod}},
                            &Parser::ParsePow);
  }
  absl::StatusOr<ExprPtr> ParsePow() {
    return ParseBinaryLevel({{"**", BinaryOp::kPow}}, &Parser::ParseUnaryWithFilters);
  }
  absl::StatusOr<ExprPtr> ParseUnaryWithFilters() { return ParseUnary(true); }

  absl::StatusOr<ExprPtr> ParseUnary(bool with_filter) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    const SourcePos pos = Current().pos;
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      const bool negate = IsOp("-");
      Advance();
      ASSIGN_OR_RETURN(ExprPtr operand, ParseUnary(false));
      node = Wrap(negate ? Expr::Kind::kNegate : Expr::Kind::kPlus, pos, std::move(operand));
    } else {
      ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) {
      ASSIGN_OR_RETURN(node, ParseFilterExpr(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    const Token& token = Current();
    const SourcePos pos = token.pos;
    switch (token.kind) {
      case Token::Kind::kName: {
        ExprPtr node = NewExpr(Expr::Kind::kLiteral, pos);
        const std::string& name = token.value;
        if (name == "true" || name == "True") {
          node->literal = Value::Bool(true);
        } else if (name == "false" || name == "False") {
          node->literal = Value::Bool(false);
        } else if (name == "none" || name == "None") {
          node->literal = Value::None();
        } else {
          node->kind = Expr::Kind::kName;
          node->name = name;
        }
        Advance();
        return node;
      }
      case Token::Kind::kString: {
        std::string text;
        while (Current().kind == Token::Kind::kString) {  // adjacent literals concatenate
          text += Current().value;
          Advance();
        }
        ExprPtr node = NewExpr(Expr::Kind::kLiteral, pos);
        node->literal = Value::String(std::move(text));
        return node;
      }
      case Token::Kind::kInteger:
      case Token::Kind::kFloat: {
        ExprPtr node = NewExpr(Expr::Kind::kLiteral, pos);
        node->literal = token.kind == Token::Kind::kInteger ? Value::Int(token.integer)
                                                            : Value::Float(token.number);
        Advance();
        return node;
      }
      case Token::Kind::kOperator:
        if (SkipOp("(")) {
          ASSIGN_OR_RETURN(ExprPtr node, ParseTuple(/*with_condition=*/true, {}, true));
          RETURN_IF_ERROR(ExpectOp(")"));
          return node;
        }
        if (IsOp("[") || IsOp("{")) return ParseListOrDict();
        break;
      default:
        break;
    }
    if (token.kind == Token::Kind::kEnd) return Fail("unexpected end of template");
    return Fail(absl::StrCat("unexpected '", Describe(token), "'"));
  }

  absl::StatusOr<ExprPtr> ParseListOrDict() {
    const bool is_dict = IsOp("{");
    const std::string_view close = is_dict ? "}" : "]";
    ExprPtr node = NewExpr(is_dict ? Expr::Kind::kDict : Expr::Kind::kList, Current().pos);
    Advance();
    while (!IsOp(close)) {
      if (!node->operands.empty()) {
        RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp(close)) break;
      }
      ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(true));
      node->operands.push_back(std::move(item));
      if (is_dict) {
        RETURN_IF_ERROR(ExpectOp(":"));
        ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        node->operands.push_back(std::move(value));
      }
    }
    RETURN_IF_ERROR(ExpectOp(close));
    return node;
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr node) {
    while (true) {
      if (IsOp(".") || IsOp("[")) {
        ASSIGN_OR_RETURN(node, ParseSubscript(std::move(node)));
      } else if (IsOp("(")) {
        ASSIGN_OR_RETURN(node, ParseCall(std::move(node), Expr::Kind::kCall, ""));
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseFilterExpr(ExprPtr node) {
    while (true) {
      if (IsOp("|")) {
        ASSIGN_OR_RETURN(node, ParseFilter(std::move(node)));
      } else if (IsName("is")) {
        ASSIGN_OR_RETURN(node, ParseTest(std::move(node)));
      } else if (IsOp("(")) {
        ASSIGN_OR_RETURN(node, ParseCall(std::move(node), Expr::Kind::kCall, ""));
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseSubscript(ExprPtr node) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    const SourcePos pos = Current().pos;
    if (SkipOp(".")) {
      if (Current().kind == Token::Kind::kName) {
        ExprPtr attr = Wrap(Expr::Kind::kGetAttr, pos, std::move(node));
        attr->name = Current().value;
        Advance();
        return attr;
      }
      if (Current().kind == Token::Kind::kInteger) {
        ExprPtr index = NewExpr(Expr::Kind::kLiteral, Current().pos);
        index->literal = Value::Int(Current().integer);
        Advance();
        return Wrap(Expr::Kind::kGetItem, pos, std::move(node), std::move(index));
      }
      return Expected("name or number");
    }
    Advance();  // [
    std::vector<ExprPtr> args;
    while (!IsOp("]")) {
      if (!args.empty()) {
        RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp("]")) break;
      }
      ASSIGN_OR_RETURN(ExprPtr arg, ParseSubscribed());
      args.push_back(std::move(arg));
    }
    RETURN_IF_ERROR(ExpectOp("]"));
    if (args.empty()) return ErrorAt(pos, "expected subscript expression");
    ExprPtr key;
    if (args.size() == 1) {
      key = std::move(args.front());
    } else {
      // jinja2 would build a tuple holding slice objects, which no sequence accepts as an index.
      for (const ExprPtr& arg : args) {
        if (arg->kind == Expr::Kind::kSlice) {
          return ErrorAt(arg->pos, "a slice inside a tuple subscript (x[a:b, c]) is not supported");
        }
      }
      key = NewExpr(Expr::Kind::kTuple, pos);
      key->operands = std::move(args);
    }
    if (key->kind == Expr::Kind::kSlice) {  // the slice node takes the object as operand 0
      key->operands.front() = std::move(node);
      return key;
    }
    return Wrap(Expr::Kind::kGetItem, pos, std::move(node), std::move(key));
  }

  // An index or a slice `a:b:c`; a slice comes back as kSlice with operand 0 empty.
  absl::StatusOr<ExprPtr> ParseSubscribed() {
    const SourcePos pos = Current().pos;
    ExprPtr start;
    if (!IsOp(":")) {
      ASSIGN_OR_RETURN(start, ParseExpression(true));
      if (!IsOp(":")) return start;
    }
    Advance();  // :
    ExprPtr slice = NewExpr(Expr::Kind::kSlice, pos);
    slice->operands.resize(4);
    slice->operands[1] = std::move(start);
    if (!IsOp("]") && !IsOp(",") && !IsOp(":")) {
      ASSIGN_OR_RETURN(slice->operands[2], ParseExpression(true));
    }
    if (SkipOp(":") && !IsOp("]") && !IsOp(",")) {
      ASSIGN_OR_RETURN(slice->operands[3], ParseExpression(true));
    }
    return slice;
  }

  // `(args)` after `callee` (kCall) or after a filter/test name (operand 0 is the value).
  absl::StatusOr<ExprPtr> ParseCall(ExprPtr callee, Expr::Kind kind, std::string name) {
    ExprPtr call = Wrap(kind, Current().pos, std::move(callee));
    call->name = std::move(name);
    RETURN_IF_ERROR(ParseCallArgs(*call));
    return call;
  }

  absl::Status ParseCallArgs(Expr& call) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    RETURN_IF_ERROR(ExpectOp("("));
    bool first = true;
    while (!IsOp(")")) {
      if (!first) {
        RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp(")")) break;
      }
      first = false;
      if (IsOp("*") || IsOp("**")) return Fail("*args and **kwargs in calls are not supported");
      if (Current().kind == Token::Kind::kName && Peek().kind == Token::Kind::kOperator &&
          Peek().value == "=") {
        std::string key = Current().value;
        Advance();
        Advance();
        ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        call.keyword_args.emplace_back(std::move(key), std::move(value));
      } else {
        if (!call.keyword_args.empty()) return Fail("invalid syntax for function call expression");
        ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        call.operands.push_back(std::move(value));
      }
    }
    Advance();  // )
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> ParseDottedName() {
    ASSIGN_OR_RETURN(std::string name, ExpectName());
    while (SkipOp(".")) {
      ASSIGN_OR_RETURN(std::string part, ExpectName());
      absl::StrAppend(&name, ".", part);
    }
    return name;
  }

  absl::StatusOr<ExprPtr> ParseFilter(ExprPtr node) {
    const SourcePos pos = Current().pos;
    Advance();  // |
    const SourcePos name_pos = Current().pos;
    ASSIGN_OR_RETURN(std::string name, ParseDottedName());
    if (!IsKnownFilter(name))
      return ErrorAt(name_pos, absl::StrCat("No filter named '", name, "'."));
    if (IsOp("(")) return ParseCall(std::move(node), Expr::Kind::kFilter, std::move(name));
    ExprPtr filter = Wrap(Expr::Kind::kFilter, pos, std::move(node));
    filter->name = std::move(name);
    return filter;
  }

  absl::StatusOr<ExprPtr> ParseTest(ExprPtr node) {
    const SourcePos pos = Current().pos;
    Advance();  // is
    const bool negated = SkipName("not");
    const SourcePos name_pos = Current().pos;
    ASSIGN_OR_RETURN(std::string name, ParseDottedName());
    if (!IsKnownTest(name)) return ErrorAt(name_pos, absl::StrCat("No test named '", name, "'."));
    ExprPtr test;
    if (IsOp("(")) {
      ASSIGN_OR_RETURN(test, ParseCall(std::move(node), Expr::Kind::kTest, std::move(name)));
    } else {
      test = Wrap(Expr::Kind::kTest, pos, std::move(node));
      test->name = std::move(name);
      // One argument without parentheses: `x is divisibleby 3`, `x is sameas none`.
      const Token& t = Current();
      const bool starts_primary = t.kind == Token::Kind::kName || t.kind == Token::Kind::kString ||
                                  t.kind == Token::Kind::kInteger ||
                                  t.kind == Token::Kind::kFloat || IsOp("(") || IsOp("[") ||
                                  IsOp("{");
      if (starts_primary && !IsName("else") && !IsName("or") && !IsName("and")) {
        if (IsName("is")) return Fail("You cannot chain multiple tests with is");
        ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
        ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
        test->operands.push_back(std::move(arg));
      }
    }
    test->pos = pos;
    test->negated = negated;
    return test;
  }

  std::vector<Token> tokens_;
  size_t index_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
};

}  // namespace

absl::Status ErrorAt(SourcePos pos, std::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("chat template line ", pos.line, ", column ", pos.column, ": ", Sv(message)));
}

bool IsPythonSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

absl::StatusOr<std::unique_ptr<Program>> ParseProgram(std::string_view source) {
  // jinja2 reads the source as text: \r\n and \r become \n, and one trailing newline is
  // dropped (keep_trailing_newline is off).
  std::string normalized;
  normalized.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      normalized += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      normalized += source[i];
    }
  }
  if (!normalized.empty() && normalized.back() == '\n') normalized.pop_back();
  size_t offset = 0;
  SourcePos pos;
  while (offset < normalized.size()) {
    utf8proc_int32_t cp = 0;
    const utf8proc_ssize_t n =
        utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(normalized.data() + offset),
                         static_cast<utf8proc_ssize_t>(normalized.size() - offset), &cp);
    if (n <= 0) return ErrorAt(pos, "template is not valid UTF-8");
    if (cp == '\n') {
      ++pos.line;
      pos.column = 1;
    } else {
      ++pos.column;
    }
    offset += static_cast<size_t>(n);
  }
  ASSIGN_OR_RETURN(std::vector<Token> tokens, Lexer(normalized).Run());
  return Parser(std::move(tokens)).Run();
}

}  // namespace moe::chat_template_internal
