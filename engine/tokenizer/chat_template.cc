// Evaluator of chat templates: walks the syntax tree of chat_template_parser.cc with jinja2's
// scoping, Undefined, sandbox and filter semantics, over the values of chat_template_value.h.
#include "engine/tokenizer/chat_template.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/chat_template_internal.h"
#include "engine/tokenizer/chat_template_value.h"

namespace moe {
namespace chat_template_internal {

// Variables of one jinja2 frame. For-loop iterations and macro calls get their own scope, so
// `set` there does not leak out (what namespace() exists for).
struct Scope {
  std::shared_ptr<Scope> parent;
  std::unordered_map<std::string, Value> variables;

  const Value* Find(const std::string& name) const {
    for (const Scope* scope = this; scope != nullptr; scope = scope->parent.get()) {
      auto it = scope->variables.find(name);
      if (it != scope->variables.end()) return &it->second;
    }
    return nullptr;
  }
};

struct Callable {
  enum class Kind { kMacro, kGlobal, kMethod };
  Kind kind;
  std::string name;
  const Stmt* macro = nullptr;
  // Where the macro was defined. Weak: the scope holds the macro, and a strong reference
  // would be a cycle. A macro outliving its scope resolves names in the template scope.
  std::weak_ptr<Scope> closure;
  Value receiver;  // kMethod
};

bool IsKnownFilter(std::string_view name) {
  static constexpr std::string_view kFilters[] = {
      "abs",        "capitalize", "count",      "d",       "default", "first", "float",
      "int",        "items",      "join",       "last",    "length",  "list",  "lower",
      "map",        "reject",     "rejectattr", "replace", "reverse", "safe",  "select",
      "selectattr", "string",     "title",      "tojson",  "trim",    "upper"};
  return std::find(std::begin(kFilters), std::end(kFilters), name) != std::end(kFilters);
}

bool IsKnownTest(std::string_view name) {
  static constexpr std::string_view kTests[] = {
      "defined", "undefined",   "none",     "string",   "number", "integer", "float",
      "boolean", "mapping",     "iterable", "sequence", "true",   "false",   "even",
      "odd",     "divisibleby", "equalto",  "eq",       "==",     "ne",      "!=",
      "lt",      "<",           "le",       "<=",       "gt",     ">",       "ge",
      ">=",      "in",          "callable", "lower",    "upper"};
  return std::find(std::begin(kTests), std::end(kTests), name) != std::end(kTests);
}

namespace {

// Errors already carrying the "chat template" prefix pass through unchanged; others get the
// position of the expression or statement that failed.
absl::Status Locate(absl::Status status, SourcePos pos) {
  if (status.ok() || absl::StartsWith(status.message(), "chat template")) return status;
  return ErrorAt(pos, std::string_view(status.message().data(), status.message().size()));
}

bool IsInt(const Value& v) { return v.kind == Value::Kind::kInt || v.kind == Value::Kind::kBool; }

Value MakeCallable(Callable callable) {
  Value v = Value::Of(Value::Kind::kCallable);
  v.callable = std::make_shared<const Callable>(std::move(callable));
  return v;
}

Value BoundMethod(const Value& receiver, std::string_view name) {
  return MakeCallable(Callable{Callable::Kind::kMethod, std::string(name), nullptr, {}, receiver});
}

// The sandbox (ImmutableSandboxedEnvironment) hides methods that modify lists and dicts.
Value UnsafeAttribute(const Value& object, std::string_view name) {
  return Value::Undefined(absl::StrCat("access to attribute '", Sv(name), "' of '",
                                       TypeName(object), "' object is unsafe."));
}

bool IsOneOf(std::string_view name, std::initializer_list<std::string_view> names) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

// Positional and keyword arguments of a call, bound to parameter names Python-style.
struct Arguments {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;

  // Binds to `names` (the rest of a function's parameters); missing ones stay absent.
  absl::StatusOr<std::vector<std::optional<Value>>> Bind(
      std::string_view function, std::initializer_list<std::string_view> names) const {
    std::vector<std::optional<Value>> bound(names.size());
    if (positional.size() > names.size()) {
      return Error(absl::StrCat(Sv(function), "() takes at most ", names.size(), " argument(s) (",
                                positional.size(), " given)"));
    }
    for (size_t i = 0; i < positional.size(); ++i) bound[i] = positional[i];
    for (const auto& [key, value] : keyword) {
      auto it = std::find(names.begin(), names.end(), key);
      if (it == names.end()) {
        return Error(
            absl::StrCat(Sv(function), "() got an unexpected keyword argument '", key, "'"));
      }
      const size_t index = static_cast<size_t>(it - names.begin());
      if (bound[index].has_value()) {
        return Error(absl::StrCat(Sv(function), "() got multiple values for argument '", key, "'"));
      }
      bound[index] = value;
    }
    return bound;
  }
};

absl::StatusOr<int64_t> ToIndex(const std::optional<Value>& v, std::string_view what,
                                int64_t fallback) {
  if (!v.has_value() || v->kind == Value::Kind::kNone) return fallback;
  if (!IsInt(*v)) {
    return Error(absl::StrCat("'", TypeName(*v), "' object cannot be interpreted as an integer (",
                              Sv(what), ")"));
  }
  return AsInt(*v);
}

const std::string* OptionalString(const std::optional<Value>& v) {
  return v.has_value() && v->is_string() ? &v->text : nullptr;
}

class Renderer {
 public:
  explicit Renderer(const ChatTemplateLimits& limits) : limits_(limits) {}

  ~Renderer() {
    // Namespaces can reference each other (or themselves) through their attributes; clear
    // them so that the cycles do not leak.
    for (const auto& ns : namespaces_) ns->entries.clear();
  }

  absl::StatusOr<std::string> Render(const Program& program,
                                     const nlohmann::ordered_json& context) {
    if (!context.is_object())
      return absl::InvalidArgumentError("chat template context must be a JSON object");
    root_ = std::make_shared<Scope>();
    for (const auto& [key, value] : context.items()) {
      ASSIGN_OR_RETURN(Value converted, FromJson(value, 1));
      root_->variables[key] = std::move(converted);
    }
    std::string out;
    ASSIGN_OR_RETURN(Flow flow, ExecBody(program.body, root_, out));
    (void)flow;  // break/continue outside loops are refused by the parser
    return out;
  }

 private:
  enum class Flow { kNormal, kBreak, kContinue };

  absl::StatusOr<Value> FromJson(const nlohmann::ordered_json& json, int depth) {
    if (depth > limits_.max_depth)
      return absl::InvalidArgumentError("chat template context nested too deeply (max_depth)");
    switch (json.type()) {
      case nlohmann::ordered_json::value_t::null:
        return Value::None();
      case nlohmann::ordered_json::value_t::boolean:
        return Value::Bool(json.get<bool>());
      case nlohmann::ordered_json::value_t::number_integer:
        return Value::Int(json.get<int64_t>());
      case nlohmann::ordered_json::value_t::number_unsigned: {
        const uint64_t u = json.get<uint64_t>();
        if (u > static_cast<uint64_t>(INT64_MAX)) return Value::Float(static_cast<double>(u));
        return Value::Int(static_cast<int64_t>(u));
      }
      case nlohmann::ordered_json::value_t::number_float:
        return Value::Float(json.get<double>());
      case nlohmann::ordered_json::value_t::string: {
        const std::string& s = json.get_ref<const std::string&>();
        if (!tokenizer_internal::ValidateUtf8(s).ok()) {
          return absl::InvalidArgumentError(
              "chat template context has a string that is not valid UTF-8");
        }
        return Value::String(s);
      }
      case nlohmann::ordered_json::value_t::array: {
        std::vector<Value> items;
        for (const auto& element : json) {
          ASSIGN_OR_RETURN(Value item, FromJson(element, depth + 1));
          items.push_back(std::move(item));
        }
        return MakeList(Value::Kind::kList, std::move(items));
      }
      case nlohmann::ordered_json::value_t::object: {
        std::vector<std::pair<Value, Value>> entries;
        for (const auto& [key, element] : json.items()) {
          ASSIGN_OR_RETURN(Value item, FromJson(element, depth + 1));
          entries.emplace_back(Value::String(key), std::move(item));
        }
        return MakeDict(std::move(entries));
      }
      default:
        return absl::InvalidArgumentError("chat template context has an unsupported JSON value");
    }
  }

  // ----- limits -----------------------------------------------------------------------

  absl::Status Step() {
    if (++steps_ > limits_.max_steps) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template exceeded max_steps (", limits_.max_steps, ")"));
    }
    return absl::OkStatus();
  }

  class DepthGuard {
   public:
    explicit DepthGuard(Renderer& renderer) : renderer_(renderer) { ++renderer_.depth_; }
    ~DepthGuard() { --renderer_.depth_; }
    absl::Status Check() const {
      if (renderer_.depth_ > renderer_.limits_.max_depth) {
        return absl::InvalidArgumentError(
            absl::StrCat("chat template exceeded max_depth (", renderer_.limits_.max_depth, ")"));
      }
      return absl::OkStatus();
    }

   private:
    Renderer& renderer_;
  };

  absl::Status Append(std::string& out, std::string_view text) {
    if (out.size() + text.size() > limits_.max_output_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chat template output exceeds max_output_bytes (", limits_.max_output_bytes, ")"));
    }
    out += text;
    return absl::OkStatus();
  }

  Value CheckedList(Value::Kind kind, std::vector<Value> items, absl::Status& status) {
    Value list = MakeList(kind, std::move(items));
    if (list.list->depth > limits_.max_depth) status = Error("value nested too deeply (max_depth)");
    return list;
  }

  absl::StatusOr<Value> NewList(Value::Kind kind, std::vector<Value> items) {
    absl::Status status;
    Value list = CheckedList(kind, std::move(items), status);
    RETURN_IF_ERROR(status);
    return list;
  }

  absl::StatusOr<Value> NewDict(std::vector<std::pair<Value, Value>> entries) {
    for (const auto& entry : entries) {
      if (!IsHashable(entry.first))
        return Error(absl::StrCat("unhashable type: '", TypeName(entry.first), "'"));
    }
    Value dict = MakeDict(std::move(entries));
    if (dict.dict->depth > limits_.max_depth) return Error("value nested too deeply (max_depth)");
    return dict;
  }

  Value NewNamespace() {
    Value v = Value::Of(Value::Kind::kNamespace);
    v.dict = std::make_shared<Dict>();
    namespaces_.push_back(v.dict);
    return v;
  }

  absl::StatusOr<std::string> ToStr(const Value& v) { return Str(v, limits_.max_depth); }

  // ----- statements -------------------------------------------------------------------

  absl::StatusOr<Flow> ExecBody(const Body& body, const std::shared_ptr<Scope>& scope,
                                std::string& out) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    for (const auto& stmt : body) {
      auto flow = Exec(*stmt, scope, out);
      if (!flow.ok()) return Locate(flow.status(), stmt->pos);
      if (*flow != Flow::kNormal) return *flow;
    }
    return Flow::kNormal;
  }

  absl::StatusOr<Flow> Exec(const Stmt& stmt, const std::shared_ptr<Scope>& scope,
                            std::string& out) {
    RETURN_IF_ERROR(Step());
    switch (stmt.kind) {
      case Stmt::Kind::kText:
        RETURN_IF_ERROR(Append(out, stmt.text));
        return Flow::kNormal;
      case Stmt::Kind::kOutput: {
        ASSIGN_OR_RETURN(Value value, Eval(*stmt.expr, scope));
        std::string text;
        RETURN_IF_ERROR(Locate(AppendStr(value, limits_.max_depth, text), stmt.expr->pos));
        RETURN_IF_ERROR(Append(out, text));
        return Flow::kNormal;
      }
      case Stmt::Kind::kIf:
        for (const auto& [condition, body] : stmt.branches) {
          ASSIGN_OR_RETURN(Value test, Eval(*condition, scope));
          if (Truthy(test)) return ExecBody(body, scope, out);
        }
        return ExecBody(stmt.else_body, scope, out);
      case Stmt::Kind::kFor:
        return ExecFor(stmt, scope, out);
      case Stmt::Kind::kSet: {
        ASSIGN_OR_RETURN(Value value, Eval(*stmt.expr, scope));
        RETURN_IF_ERROR(Assign(stmt, std::move(value), *scope));
        return Flow::kNormal;
      }
      case Stmt::Kind::kSetAttr: {
        const Value* target = scope->Find(stmt.targets.front());
        if (target == nullptr || target->kind != Value::Kind::kNamespace) {
          return Error("cannot assign attribute on non-namespace object");
        }
        const std::shared_ptr<Dict> ns = target->dict;  // keep alive while evaluating
        ASSIGN_OR_RETURN(Value value, Eval(*stmt.expr, scope));
        DictSet(*ns, Value::String(stmt.text), std::move(value));
        return Flow::kNormal;
      }
      case Stmt::Kind::kSetBlock: {
        std::string text;
        RETURN_IF_ERROR(
            ExecBody(stmt.body, std::make_shared<Scope>(Scope{scope, {}}), text).status());
        scope->variables[stmt.targets.front()] = Value::String(std::move(text));
        return Flow::kNormal;
      }
      case Stmt::Kind::kMacro:
        scope->variables[stmt.text] =
            MakeCallable(Callable{Callable::Kind::kMacro, stmt.text, &stmt, scope, {}});
        return Flow::kNormal;
      case Stmt::Kind::kBreak:
        return Flow::kBreak;
      case Stmt::Kind::kContinue:
        return Flow::kContinue;
      case Stmt::Kind::kGeneration:
        RETURN_IF_ERROR(
            ExecBody(stmt.body, std::make_shared<Scope>(Scope{scope, {}}), out).status());
        return Flow::kNormal;
    }
    return Flow::kNormal;
  }

  // Binds `value` to the statement's targets, unpacking when they were written as a tuple.
  absl::Status Assign(const Stmt& stmt, Value value, Scope& scope) {
    if (!stmt.unpack) {
      scope.variables[stmt.targets.front()] = std::move(value);
      return absl::OkStatus();
    }
    if (value.is_undefined()) return Error(value.text);
    ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
    if (items.size() != stmt.targets.size()) {
      if (items.size() > stmt.targets.size()) {
        return Error(
            absl::StrCat("too many values to unpack (expected ", stmt.targets.size(), ")"));
      }
      return Error(absl::StrCat("not enough values to unpack (expected ", stmt.targets.size(),
                                ", got ", items.size(), ")"));
    }
    for (size_t i = 0; i < items.size(); ++i)
      scope.variables[stmt.targets[i]] = std::move(items[i]);
    return absl::OkStatus();
  }

  absl::StatusOr<Flow> ExecFor(const Stmt& stmt, const std::shared_ptr<Scope>& scope,
                               std::string& out) {
    ASSIGN_OR_RETURN(Value iterable, Eval(*stmt.expr, scope));
    ASSIGN_OR_RETURN(std::vector<Value> all_items, Iterate(iterable));
    // The `if` filter applies before the loop counts items (loop.length sees only kept ones).
    std::vector<Value> kept;
    for (Value& item : all_items) {
      RETURN_IF_ERROR(Step());
      if (stmt.condition != nullptr) {
        auto filter_scope = std::make_shared<Scope>(Scope{scope, {}});
        RETURN_IF_ERROR(Assign(stmt, item, *filter_scope));
        ASSIGN_OR_RETURN(Value keep, Eval(*stmt.condition, filter_scope));
        if (!Truthy(keep)) continue;
      }
      kept.push_back(std::move(item));
    }
    if (kept.empty())
      return ExecBody(stmt.else_body, std::make_shared<Scope>(Scope{scope, {}}), out);
    auto items = std::make_shared<List>();
    items->items = std::move(kept);
    for (size_t i = 0; i < items->items.size(); ++i) {
      RETURN_IF_ERROR(Step());
      auto iteration = std::make_shared<Scope>(Scope{scope, {}});
      RETURN_IF_ERROR(Assign(stmt, items->items[i], *iteration));
      Value loop = Value::Of(Value::Kind::kLoop);
      loop.loop = std::make_shared<const LoopState>(LoopState{items, i});
      iteration->variables["loop"] = std::move(loop);
      ASSIGN_OR_RETURN(Flow flow, ExecBody(stmt.body, iteration, out));
      if (flow == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  // ----- expressions ------------------------------------------------------------------

  absl::StatusOr<Value> Eval(const Expr& expr, const std::shared_ptr<Scope>& scope) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    RETURN_IF_ERROR(Step());
    auto value = EvalUnlocated(expr, scope);
    if (!value.ok()) return Locate(value.status(), expr.pos);
    return value;
  }

  absl::StatusOr<std::vector<Value>> EvalAll(const std::vector<ExprPtr>& exprs, size_t from,
                                             const std::shared_ptr<Scope>& scope) {
    std::vector<Value> values;
    for (size_t i = from; i < exprs.size(); ++i) {
      ASSIGN_OR_RETURN(Value v, Eval(*exprs[i], scope));
      values.push_back(std::move(v));
    }
    return values;
  }

  absl::StatusOr<Arguments> EvalArguments(const Expr& expr, size_t from,
                                          const std::shared_ptr<Scope>& scope) {
    Arguments args;
    ASSIGN_OR_RETURN(args.positional, EvalAll(expr.operands, from, scope));
    for (const auto& [name, value_expr] : expr.keyword_args) {
      ASSIGN_OR_RETURN(Value v, Eval(*value_expr, scope));
      args.keyword.emplace_back(name, std::move(v));
    }
    return args;
  }

  absl::StatusOr<Value> EvalUnlocated(const Expr& expr, const std::shared_ptr<Scope>& scope) {
    switch (expr.kind) {
      case Expr::Kind::kLiteral:
        return expr.literal;
      case Expr::Kind::kName:
        return LookupName(expr.name, *scope);
      case Expr::Kind::kList:
      case Expr::Kind::kTuple: {
        ASSIGN_OR_RETURN(std::vector<Value> items, EvalAll(expr.operands, 0, scope));
        return NewList(expr.kind == Expr::Kind::kList ? Value::Kind::kList : Value::Kind::kTuple,
                       std::move(items));
      }
      case Expr::Kind::kDict: {
        std::vector<std::pair<Value, Value>> entries;
        for (size_t i = 0; i + 1 < expr.operands.size(); i += 2) {
          ASSIGN_OR_RETURN(Value key, Eval(*expr.operands[i], scope));
          ASSIGN_OR_RETURN(Value value, Eval(*expr.operands[i + 1], scope));
          entries.emplace_back(std::move(key), std::move(value));
        }
        return NewDict(std::move(entries));
      }
      case Expr::Kind::kGetAttr: {
        ASSIGN_OR_RETURN(Value object, Eval(*expr.operands[0], scope));
        return GetAttr(object, expr.name);
      }
      case Expr::Kind::kGetItem: {
        ASSIGN_OR_RETURN(Value object, Eval(*expr.operands[0], scope));
        ASSIGN_OR_RETURN(Value key, Eval(*expr.operands[1], scope));
        return GetItem(object, key);
      }
      case Expr::Kind::kSlice:
        return EvalSlice(expr, scope);
      case Expr::Kind::kCall: {
        ASSIGN_OR_RETURN(Value callee, Eval(*expr.operands[0], scope));
        ASSIGN_OR_RETURN(Arguments args, EvalArguments(expr, 1, scope));
        return Call(callee, args);
      }
      case Expr::Kind::kFilter: {
        ASSIGN_OR_RETURN(Value value, Eval(*expr.operands[0], scope));
        ASSIGN_OR_RETURN(Arguments args, EvalArguments(expr, 1, scope));
        return ApplyFilter(expr.name, value, args);
      }
      case Expr::Kind::kTest: {
        ASSIGN_OR_RETURN(Value value, Eval(*expr.operands[0], scope));
        ASSIGN_OR_RETURN(Arguments args, EvalArguments(expr, 1, scope));
        ASSIGN_OR_RETURN(bool result, ApplyTest(expr.name, value, args));
        return Value::Bool(result != expr.negated);
      }
      case Expr::Kind::kNegate:
      case Expr::Kind::kPlus: {
        ASSIGN_OR_RETURN(Value operand, Eval(*expr.operands[0], scope));
        if (operand.is_undefined()) return Error(operand.text);
        const bool negate = expr.kind == Expr::Kind::kNegate;
        if (operand.kind == Value::Kind::kFloat)
          return Value::Float(negate ? -operand.number : operand.number);
        if (IsInt(operand)) {
          const int64_t i = AsInt(operand);
          if (!negate) return Value::Int(i);
          if (i == INT64_MIN) return Error("integer overflow");
          return Value::Int(-i);
        }
        return Error(absl::StrCat("bad operand type for unary ", negate ? "-" : "+", ": '",
                                  TypeName(operand), "'"));
      }
      case Expr::Kind::kNot: {
        ASSIGN_OR_RETURN(Value operand, Eval(*expr.operands[0], scope));
        return Value::Bool(!Truthy(operand));
      }
      case Expr::Kind::kBinary: {
        ASSIGN_OR_RETURN(Value left, Eval(*expr.operands[0], scope));
        ASSIGN_OR_RETURN(Value right, Eval(*expr.operands[1], scope));
        if (expr.binary_op == BinaryOp::kConcat) {
          ASSIGN_OR_RETURN(std::string a, ToStr(left));
          ASSIGN_OR_RETURN(std::string b, ToStr(right));
          if (a.size() + b.size() > limits_.max_output_bytes)
            return Error("string too large (max_output_bytes)");
          return Value::String(a + b);
        }
        return Arithmetic(expr.binary_op, left, right, limits_.max_output_bytes);
      }
      case Expr::Kind::kCompare: {
        // Chained like Python: a < b < c is (a < b) and (b < c), b evaluated once.
        ASSIGN_OR_RETURN(Value left, Eval(*expr.operands[0], scope));
        for (size_t i = 0; i < expr.compare_ops.size(); ++i) {
          ASSIGN_OR_RETURN(Value right, Eval(*expr.operands[i + 1], scope));
          ASSIGN_OR_RETURN(bool holds, Compare(left, right, expr.compare_ops[i]));
          if (!holds) return Value::Bool(false);
          left = std::move(right);
        }
        return Value::Bool(true);
      }
      case Expr::Kind::kAnd:
      case Expr::Kind::kOr: {
        // Python returns the deciding operand, not a bool.
        ASSIGN_OR_RETURN(Value left, Eval(*expr.operands[0], scope));
        if (Truthy(left) == (expr.kind == Expr::Kind::kOr)) return left;
        return Eval(*expr.operands[1], scope);
      }
      case Expr::Kind::kCondition: {
        ASSIGN_OR_RETURN(Value test, Eval(*expr.operands[0], scope));
        if (Truthy(test)) return Eval(*expr.operands[1], scope);
        if (expr.operands[2] == nullptr) {
          return Value::Undefined(
              "the inline if-expression evaluated to false and no else section was defined.");
        }
        return Eval(*expr.operands[2], scope);
      }
    }
    return Error("unsupported expression");
  }

  Value LookupName(const std::string& name, const Scope& scope) {
    if (const Value* v = scope.Find(name)) return *v;
    if (IsOneOf(name, {"range", "namespace", "raise_exception", "dict"})) {
      return MakeCallable(Callable{Callable::Kind::kGlobal, name, nullptr, {}, {}});
    }
    return UndefinedName(name);
  }

  // jinja2's getattr: the attribute (method) first, then the item.
  absl::StatusOr<Value> GetAttr(const Value& object, const std::string& name) {
    switch (object.kind) {
      case Value::Kind::kUndefined:
        return Error(object.text);
      case Value::Kind::kDict:
        if (IsOneOf(name, {"get", "items", "keys", "values"})) return BoundMethod(object, name);
        if (IsOneOf(name, {"clear", "pop", "popitem", "setdefault", "update"}))
          return UnsafeAttribute(object, name);
        if (const Value* v = DictFind(*object.dict, name)) return *v;
        return MissingAttribute(object, name);
      case Value::Kind::kNamespace:
        if (const Value* v = DictFind(*object.dict, name)) return *v;
        return MissingAttribute(object, name);
      case Value::Kind::kString:
        if (IsOneOf(name, {"startswith", "endswith", "strip", "lstrip", "rstrip", "split", "lower",
                           "upper", "replace", "title", "capitalize", "find", "count", "join"})) {
          return BoundMethod(object, name);
        }
        return MissingAttribute(object, name);
      case Value::Kind::kList:
        if (IsOneOf(name,
                    {"append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort"})) {
          return UnsafeAttribute(object, name);
        }
        return MissingAttribute(object, name);
      case Value::Kind::kLoop:
        return LoopAttribute(object, name);
      default:
        return MissingAttribute(object, name);
    }
  }

  Value LoopAttribute(const Value& loop_value, const std::string& name) {
    const LoopState& loop = *loop_value.loop;
    const auto& items = loop.items->items;
    const auto length = static_cast<int64_t>(items.size());
    const auto index0 = static_cast<int64_t>(loop.index0);
    if (name == "index") return Value::Int(index0 + 1);
    if (name == "index0") return Value::Int(index0);
    if (name == "revindex") return Value::Int(length - index0);
    if (name == "revindex0") return Value::Int(length - index0 - 1);
    if (name == "first") return Value::Bool(index0 == 0);
    if (name == "last") return Value::Bool(index0 == length - 1);
    if (name == "length") return Value::Int(length);
    if (name == "depth") return Value::Int(1);
    if (name == "depth0") return Value::Int(0);
    if (name == "previtem") {
      return index0 > 0 ? items[loop.index0 - 1] : Value::Undefined("there is no previous item");
    }
    if (name == "nextitem") {
      return index0 + 1 < length ? items[loop.index0 + 1]
                                 : Value::Undefined("there is no next item");
    }
    if (name == "cycle") return BoundMethod(loop_value, name);
    return MissingAttribute(loop_value, name);
  }

  // jinja2's getitem: the item first, then (for string keys) the attribute.
  absl::StatusOr<Value> GetItem(const Value& object, const Value& key) {
    switch (object.kind) {
      case Value::Kind::kUndefined:
        return Error(object.text);
      case Value::Kind::kDict:
        if (IsHashable(key)) {
          if (const Value* v = DictFind(*object.dict, key)) return *v;
        }
        break;
      case Value::Kind::kList:
      case Value::Kind::kTuple:
      case Value::Kind::kString:
        if (IsInt(key)) {
          ASSIGN_OR_RETURN(int64_t length, Length(object));
          int64_t index = AsInt(key);
          if (index < 0) index += length;
          if (index >= 0 && index < length) {
            if (!object.is_string()) return object.list->items[static_cast<size_t>(index)];
            const std::vector<size_t> offsets = CodePointOffsets(object.text);
            const size_t at = offsets[static_cast<size_t>(index)];
            return Value::String(
                object.text.substr(at, offsets[static_cast<size_t>(index) + 1] - at));
          }
        }
        break;
      default:
        break;
    }
    if (key.is_string()) return GetAttr(object, key.text);
    std::string key_repr;
    RETURN_IF_ERROR(AppendRepr(key, limits_.max_depth, key_repr));
    return Value::Undefined(absl::StrCat(ObjectDescription(object), " has no element ", key_repr));
  }

  absl::StatusOr<Value> EvalSlice(const Expr& expr, const std::shared_ptr<Scope>& scope) {
    ASSIGN_OR_RETURN(Value object, Eval(*expr.operands[0], scope));
    std::optional<Value> bounds[3];
    for (int i = 0; i < 3; ++i) {
      if (expr.operands[i + 1] != nullptr) {
        ASSIGN_OR_RETURN(bounds[i], Eval(*expr.operands[i + 1], scope));
      }
    }
    if (object.is_undefined()) return Error(object.text);
    if (!object.is_sequence() && !object.is_string()) {
      return Value::Undefined(absl::StrCat(ObjectDescription(object), " has no element slice"));
    }
    for (const auto& bound : bounds) {
      if (bound.has_value() && bound->kind != Value::Kind::kNone && !IsInt(*bound)) {
        return Error("slice indices must be integers or None or have an __index__ method");
      }
    }
    ASSIGN_OR_RETURN(int64_t step, ToIndex(bounds[2], "slice step", 1));
    if (step == 0) return Error("slice step cannot be zero");
    ASSIGN_OR_RETURN(const int64_t length, Length(object));
    // CPython's PySlice_AdjustIndices.
    auto adjust = [&](const std::optional<Value>& bound, int64_t if_missing) -> int64_t {
      if (!bound.has_value() || bound->kind == Value::Kind::kNone) return if_missing;
      int64_t i = AsInt(*bound);
      if (i < 0) {
        i += length;
        if (i < 0) i = step < 0 ? -1 : 0;
      } else if (i >= length) {
        i = step < 0 ? length - 1 : length;
      }
      return i;
    };
    const int64_t start = adjust(bounds[0], step < 0 ? length - 1 : 0);
    const int64_t stop = adjust(bounds[1], step < 0 ? -1 : length);
    std::vector<int64_t> indices;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      indices.push_back(i);
      if ((step > 0 && i > INT64_MAX - step) || (step < 0 && i < INT64_MIN - step)) break;
    }
    if (object.is_string()) {
      const std::vector<size_t> offsets = CodePointOffsets(object.text);
      std::string out;
      for (int64_t i : indices) {
        const auto at = static_cast<size_t>(i);
        out.append(object.text, offsets[at], offsets[at + 1] - offsets[at]);
      }
      return Value::String(std::move(out));
    }
    std::vector<Value> items;
    for (int64_t i : indices) items.push_back(object.list->items[static_cast<size_t>(i)]);
    return NewList(object.kind, std::move(items));
  }

  // ----- calls ------------------------------------------------------------------------

  absl::StatusOr<Value> Call(const Value& callee, const Arguments& args) {
    if (callee.is_undefined()) return Error(callee.text);
    if (callee.kind != Value::Kind::kCallable) {
      return Error(absl::StrCat("'", TypeName(callee), "' object is not callable"));
    }
    const Callable& callable = *callee.callable;
    switch (callable.kind) {
      case Callable::Kind::kMacro:
        return CallMacro(callable, args);
      case Callable::Kind::kGlobal:
        return CallGlobal(callable.name, args);
      case Callable::Kind::kMethod:
        return CallMethod(callable.receiver, callable.name, args);
    }
    return Error("not callable");
  }

  absl::StatusOr<Value> CallMacro(const Callable& macro, const Arguments& args) {
    DepthGuard guard(*this);
    RETURN_IF_ERROR(guard.Check());
    const Stmt& stmt = *macro.macro;
    std::shared_ptr<Scope> closure = macro.closure.lock();
    auto scope = std::make_shared<Scope>(Scope{closure != nullptr ? closure : root_, {}});
    if (args.positional.size() > stmt.params.size()) {
      return Error(absl::StrCat("macro '", stmt.text, "' takes not more than ", stmt.params.size(),
                                " argument(s)"));
    }
    std::vector<bool> given(stmt.params.size(), false);
    for (size_t i = 0; i < args.positional.size(); ++i) {
      scope->variables[stmt.params[i].name] = args.positional[i];
      given[i] = true;
    }
    for (const auto& keyword : args.keyword) {
      const std::string& name = keyword.first;
      const Value& value = keyword.second;
      auto it = std::find_if(stmt.params.begin(), stmt.params.end(),
                             [&](const MacroParam& p) { return p.name == name; });
      if (it == stmt.params.end())
        return Error(
            absl::StrCat("macro '", stmt.text, "' takes no keyword argument '", name, "'"));
      const size_t index = static_cast<size_t>(it - stmt.params.begin());
      if (given[index])
        return Error(
            absl::StrCat("macro '", stmt.text, "' got multiple values for argument '", name, "'"));
      scope->variables[name] = value;
      given[index] = true;
    }
    for (size_t i = 0; i < stmt.params.size(); ++i) {
      if (given[i]) continue;
      const MacroParam& param = stmt.params[i];
      if (param.default_value != nullptr) {
        ASSIGN_OR_RETURN(scope->variables[param.name], Eval(*param.default_value, scope));
      } else {
        scope->variables[param.name] =
            Value::Undefined(absl::StrCat("parameter '", param.name, "' was not provided"));
      }
    }
    std::string out;
    RETURN_IF_ERROR(ExecBody(stmt.body, scope, out).status());
    return Value::String(std::move(out));
  }

  absl::StatusOr<Value> CallGlobal(const std::string& name, const Arguments& args) {
    if (name == "raise_exception") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"message"}));
      ASSIGN_OR_RETURN(std::string message, ToStr(bound[0].value_or(Value::Undefined(""))));
      return absl::InvalidArgumentError(absl::StrCat("chat template: ", message));
    }
    if (name == "namespace" || name == "dict") {
      if (args.positional.size() > 1)
        return Error(absl::StrCat(name, " expected at most 1 argument"));
      std::vector<std::pair<Value, Value>> entries;
      if (!args.positional.empty()) {
        const Value& initial = args.positional.front();
        if (initial.kind != Value::Kind::kDict)
          return Error(absl::StrCat(name, "() argument must be a dict"));
        entries = initial.dict->entries;
      }
      for (const auto& [key, value] : args.keyword) entries.emplace_back(Value::String(key), value);
      if (name == "dict") return NewDict(std::move(entries));
      Value ns = NewNamespace();
      for (auto& [key, value] : entries) DictSet(*ns.dict, std::move(key), std::move(value));
      return ns;
    }
    // range([start,] stop[, step]), refused above 100000 items as jinja2's sandbox does.
    if (!args.keyword.empty()) return Error("range() takes no keyword arguments");
    if (args.positional.empty() || args.positional.size() > 3) {
      return Error(
          absl::StrCat("range expected at least 1 argument, got ", args.positional.size()));
    }
    std::vector<int64_t> numbers;
    for (const Value& v : args.positional) {
      if (!IsInt(v))
        return Error(
            absl::StrCat("'", TypeName(v), "' object cannot be interpreted as an integer"));
      numbers.push_back(AsInt(v));
    }
    const int64_t start = numbers.size() == 1 ? 0 : numbers[0];
    const int64_t stop = numbers.size() == 1 ? numbers[0] : numbers[1];
    const int64_t step = numbers.size() == 3 ? numbers[2] : 1;
    if (step == 0) return Error("range() arg 3 must not be zero");
    const __int128 span =
        step > 0 ? static_cast<__int128>(stop) - start : static_cast<__int128>(start) - stop;
    const __int128 magnitude = step > 0 ? step : -static_cast<__int128>(step);
    const __int128 count = span <= 0 ? 0 : (span + magnitude - 1) / magnitude;
    if (count > 100000) {
      return Error("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
    }
    std::vector<Value> items;
    for (__int128 i = 0; i < count; ++i) {
      RETURN_IF_ERROR(Step());
      items.push_back(Value::Int(static_cast<int64_t>(start + i * step)));
    }
    return NewList(Value::Kind::kList, std::move(items));
  }

  absl::StatusOr<Value> CallMethod(const Value& self, const std::string& name,
                                   const Arguments& args) {
    if (self.kind == Value::Kind::kLoop) {  // loop.cycle(a, b, ...)
      if (args.positional.empty()) return Error("no items for cycling given");
      return args.positional[self.loop->index0 % args.positional.size()];
    }
    if (self.kind == Value::Kind::kDict) {
      if (name == "get") {
        ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"key", "default"}));
        if (!bound[0].has_value()) return Error("get expected at least 1 argument, got 0");
        if (!IsHashable(*bound[0]))
          return Error(absl::StrCat("unhashable type: '", TypeName(*bound[0]), "'"));
        if (const Value* v = DictFind(*self.dict, *bound[0])) return *v;
        return bound[1].value_or(Value::None());
      }
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      std::vector<Value> items;
      for (const auto& [key, value] : self.dict->entries) {
        if (name == "keys")
          items.push_back(key);
        else if (name == "values")
          items.push_back(value);
        else
          items.push_back(MakeList(Value::Kind::kTuple, {key, value}));
      }
      return NewList(Value::Kind::kList, std::move(items));
    }
    return CallStringMethod(self.text, name, args);
  }

  absl::StatusOr<Value> CallStringMethod(const std::string& text, const std::string& name,
                                         const Arguments& args) {
    if (name == "startswith" || name == "endswith") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"prefix"}));
      if (!bound[0].has_value())
        return Error(absl::StrCat(name, "() takes at least 1 argument (0 given)"));
      std::vector<Value> candidates{*bound[0]};
      if (bound[0]->kind == Value::Kind::kTuple) candidates = bound[0]->list->items;
      for (const Value& candidate : candidates) {
        if (!candidate.is_string()) {
          return Error(absl::StrCat(name, " first arg must be str or a tuple of str, not ",
                                    TypeName(candidate)));
        }
        const std::string& affix = candidate.text;
        const bool match = affix.size() <= text.size() &&
                           (name == "startswith" ? text.compare(0, affix.size(), affix) == 0
                                                 : text.compare(text.size() - affix.size(),
                                                                affix.size(), affix) == 0);
        if (match) return Value::Bool(true);
      }
      return Value::Bool(false);
    }
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"chars"}));
      if (bound[0].has_value() && !bound[0]->is_string() && bound[0]->kind != Value::Kind::kNone) {
        return Error(absl::StrCat(name, " arg must be None or str"));
      }
      return Value::String(
          std::string(Strip(text, OptionalString(bound[0]), name != "rstrip", name != "lstrip")));
    }
    if (name == "split") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"sep", "maxsplit"}));
      if (bound[0].has_value() && !bound[0]->is_string() && bound[0]->kind != Value::Kind::kNone) {
        return Error(absl::StrCat("must be str or None, not ", TypeName(*bound[0])));
      }
      ASSIGN_OR_RETURN(int64_t max_split, ToIndex(bound[1], "maxsplit", -1));
      ASSIGN_OR_RETURN(std::vector<std::string> parts,
                       Split(text, OptionalString(bound[0]), max_split));
      std::vector<Value> items;
      for (auto& part : parts) items.push_back(Value::String(std::move(part)));
      return NewList(Value::Kind::kList, std::move(items));
    }
    if (name == "lower" || name == "upper" || name == "title" || name == "capitalize") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      const CaseMapping mapping = name == "lower"   ? CaseMapping::kLower
                                  : name == "upper" ? CaseMapping::kUpper
                                  : name == "title" ? CaseMapping::kTitle
                                                    : CaseMapping::kCapitalize;
      return Value::String(MapCase(text, mapping));
    }
    if (name == "replace") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"old", "new", "count"}));
      if (!bound[0].has_value() || !bound[0]->is_string() || !bound[1].has_value() ||
          !bound[1]->is_string()) {
        return Error("replace() arguments 1 and 2 must be str");
      }
      ASSIGN_OR_RETURN(int64_t count, ToIndex(bound[2], "count", -1));
      ASSIGN_OR_RETURN(std::string replaced, Replace(text, bound[0]->text, bound[1]->text, count,
                                                     limits_.max_output_bytes));
      return Value::String(std::move(replaced));
    }
    if (name == "find" || name == "count") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"sub"}));
      if (!bound[0].has_value() || !bound[0]->is_string())
        return Error(absl::StrCat(name, "() argument must be str"));
      const std::string& sub = bound[0]->text;
      if (name == "find") {
        const size_t at = text.find(sub);
        return Value::Int(at == std::string::npos ? -1
                                                  : static_cast<int64_t>(CodePointCount(
                                                        std::string_view(text).substr(0, at))));
      }
      if (sub.empty()) return Value::Int(static_cast<int64_t>(CodePointCount(text)) + 1);
      int64_t count = 0;
      for (size_t at = text.find(sub); at != std::string::npos;
           at = text.find(sub, at + sub.size()))
        ++count;
      return Value::Int(count);
    }
    // join
    ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"iterable"}));
    if (!bound[0].has_value()) return Error("join() takes exactly one argument (0 given)");
    ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(*bound[0]));
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].is_string()) {
        return Error(absl::StrCat("sequence item ", i, ": expected str instance, ",
                                  TypeName(items[i]), " found"));
      }
      if (i > 0) out += text;
      out += items[i].text;
      if (out.size() > limits_.max_output_bytes)
        return Error("string too large (max_output_bytes)");
    }
    return Value::String(std::move(out));
  }

  // ----- filters ----------------------------------------------------------------------

  // jinja2's make_attrgetter: "a.b.0" looks up each part with getitem.
  absl::StatusOr<Value> GetAttributePath(const Value& item, const std::string& path) {
    Value current = item;
    size_t start = 0;
    while (true) {
      const size_t dot = path.find('.', start);
      const std::string part =
          path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      Value key = Value::String(part);
      if (!part.empty() &&
          std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
          part.size() < 18) {
        key = Value::Int(std::strtoll(part.c_str(), nullptr, 10));
      }
      ASSIGN_OR_RETURN(current, GetItem(current, key));
      if (dot == std::string::npos) return current;
      start = dot + 1;
    }
  }

  absl::StatusOr<Value> ApplyFilter(const std::string& name, const Value& value,
                                    const Arguments& args) {
    if (name == "tojson") return ToJson(value, args);
    if (name == "default" || name == "d") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"default_value", "boolean"}));
      const bool use_default =
          value.is_undefined() || (bound[1].has_value() && Truthy(*bound[1]) && !Truthy(value));
      return use_default ? bound[0].value_or(Value::String("")) : value;
    }
    if (name == "length" || name == "count") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      ASSIGN_OR_RETURN(int64_t length, Length(value));
      return Value::Int(length);
    }
    if (name == "trim") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"chars"}));
      ASSIGN_OR_RETURN(std::string text, ToStr(value));
      return Value::String(std::string(Strip(text, OptionalString(bound[0]), true, true)));
    }
    if (name == "upper" || name == "lower" || name == "capitalize") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      ASSIGN_OR_RETURN(std::string text, ToStr(value));
      return Value::String(MapCase(text, name == "upper"   ? CaseMapping::kUpper
                                         : name == "lower" ? CaseMapping::kLower
                                                           : CaseMapping::kCapitalize));
    }
    if (name == "title") return TitleFilter(value, args);
    if (name == "string" || name == "safe") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      ASSIGN_OR_RETURN(std::string text, ToStr(value));
      return Value::String(std::move(text));
    }
    if (name == "replace") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"old", "new", "count"}));
      ASSIGN_OR_RETURN(std::string text, ToStr(value));
      ASSIGN_OR_RETURN(std::string old_text, ToStr(bound[0].value_or(Value::Undefined(""))));
      ASSIGN_OR_RETURN(std::string new_text, ToStr(bound[1].value_or(Value::Undefined(""))));
      if (!bound[0].has_value() || !bound[1].has_value())
        return Error("replace filter needs old and new");
      ASSIGN_OR_RETURN(int64_t count, ToIndex(bound[2], "count", -1));
      ASSIGN_OR_RETURN(std::string replaced,
                       Replace(text, old_text, new_text, count, limits_.max_output_bytes));
      return Value::String(std::move(replaced));
    }
    if (name == "join") {
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"d", "attribute"}));
      ASSIGN_OR_RETURN(std::string separator, ToStr(bound[0].value_or(Value::String(""))));
      ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        Value item = items[i];
        if (bound[1].has_value() && bound[1]->kind != Value::Kind::kNone) {
          ASSIGN_OR_RETURN(std::string path, ToStr(*bound[1]));
          ASSIGN_OR_RETURN(item, GetAttributePath(item, path));
        }
        if (i > 0) out += separator;
        RETURN_IF_ERROR(AppendStr(item, limits_.max_depth, out));
        if (out.size() > limits_.max_output_bytes)
          return Error("string too large (max_output_bytes)");
      }
      return Value::String(std::move(out));
    }
    if (name == "first" || name == "last") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
      if (items.empty()) {
        return Value::Undefined(absl::StrCat("No ", name, " item, sequence was empty."));
      }
      return name == "first" ? items.front() : items.back();
    }
    if (name == "list") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
      return NewList(Value::Kind::kList, std::move(items));
    }
    if (name == "reverse") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
      std::reverse(items.begin(), items.end());
      if (value.is_string()) {
        std::string out;
        for (const Value& c : items) out += c.text;
        return Value::String(std::move(out));
      }
      return NewList(Value::Kind::kList, std::move(items));
    }
    if (name == "items") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      if (value.is_undefined()) return NewList(Value::Kind::kList, {});
      if (value.kind != Value::Kind::kDict) return Error("Can only get item pairs from a mapping.");
      return CallMethod(value, "items", Arguments{});
    }
    if (name == "int" || name == "float") return NumberFilter(name, value, args);
    if (name == "abs") {
      RETURN_IF_ERROR(args.Bind(name, {}).status());
      if (value.kind == Value::Kind::kFloat) return Value::Float(std::fabs(value.number));
      if (IsInt(value)) {
        if (AsInt(value) == INT64_MIN) return Error("integer overflow");
        return Value::Int(std::llabs(AsInt(value)));
      }
      return Error(absl::StrCat("bad operand type for abs(): '", TypeName(value), "'"));
    }
    if (name == "map") return MapFilter(value, args);
    // select, reject, selectattr, rejectattr
    const bool by_attribute = name == "selectattr" || name == "rejectattr";
    const bool keep_matches = name == "select" || name == "selectattr";
    ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
    size_t next_arg = 0;
    std::string attribute;
    if (by_attribute) {
      if (args.positional.empty()) return Error("Missing parameter for attribute name");
      ASSIGN_OR_RETURN(attribute, ToStr(args.positional[0]));
      next_arg = 1;
    }
    std::string test;
    if (args.positional.size() > next_arg) {
      ASSIGN_OR_RETURN(test, ToStr(args.positional[next_arg]));
      ++next_arg;
    }
    Arguments test_args;
    test_args.positional.assign(args.positional.begin() + static_cast<std::ptrdiff_t>(next_arg),
                                args.positional.end());
    test_args.keyword = args.keyword;
    std::vector<Value> kept;
    for (const Value& item : items) {
      RETURN_IF_ERROR(Step());
      Value subject = item;
      if (by_attribute) {
        ASSIGN_OR_RETURN(subject, GetAttributePath(item, attribute));
      }
      bool match = false;
      if (test.empty()) {
        match = Truthy(subject);
      } else {
        ASSIGN_OR_RETURN(match, ApplyTest(test, subject, test_args));
      }
      if (match == keep_matches) kept.push_back(item);
    }
    return NewList(Value::Kind::kList, std::move(kept));
  }

  // jinja2's title filter: words start after runs of whitespace, '-', '(', '{', '[' or '<'.
  absl::StatusOr<Value> TitleFilter(const Value& value, const Arguments& args) {
    RETURN_IF_ERROR(args.Bind("title", {}).status());
    ASSIGN_OR_RETURN(std::string text, ToStr(value));
    std::string out;
    bool word_start = true;
    for (size_t pos = 0; pos < text.size();) {
      const size_t start = pos;
      const char32_t c = NextCodePoint(text, pos);
      const std::string piece = text.substr(start, pos - start);
      const bool separator =
          IsPythonSpace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
      if (separator) {
        out += piece;
        word_start = true;
      } else {
        out += MapCase(piece, word_start ? CaseMapping::kUpper : CaseMapping::kLower);
        word_start = false;
      }
    }
    return Value::String(std::move(out));
  }

  absl::StatusOr<Value> NumberFilter(const std::string& name, const Value& value,
                                     const Arguments& args) {
    const bool to_int = name == "int";
    ASSIGN_OR_RETURN(auto bound,
                     to_int ? args.Bind(name, {"default", "base"}) : args.Bind(name, {"default"}));
    const Value fallback = bound[0].value_or(to_int ? Value::Int(0) : Value::Float(0.0));
    if (value.is_undefined()) return Error(value.text);
    if (value.is_number()) {
      if (!to_int) return Value::Float(AsDouble(value));
      if (IsInt(value)) return Value::Int(AsInt(value));
      if (!std::isfinite(value.number) || std::fabs(value.number) >= 9.2e18) return fallback;
      return Value::Int(static_cast<int64_t>(value.number));
    }
    if (!value.is_string()) return fallback;
    const std::string text(Strip(value.text, nullptr, true, true));
    std::string cleaned;  // Python accepts "_" between digits
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '_' && i > 0 && i + 1 < text.size() &&
          std::isdigit(static_cast<unsigned char>(text[i - 1])) &&
          std::isdigit(static_cast<unsigned char>(text[i + 1]))) {
        continue;
      }
      cleaned += text[i];
    }
    if (to_int) {
      ASSIGN_OR_RETURN(int64_t base, ToIndex(bound[1], "base", 10));
      if (base == 10 && !cleaned.empty()) {
        const char* begin = cleaned.c_str();
        char* end = nullptr;
        errno = 0;
        const long long parsed = std::strtoll(begin, &end, 10);
        const bool digits_only =
            std::all_of(cleaned.begin() + (cleaned[0] == '+' || cleaned[0] == '-'), cleaned.end(),
                        [](char c) { return c >= '0' && c <= '9'; });
        if (digits_only && end != begin && *end == '\0' && errno == 0) return Value::Int(parsed);
      }
    }
    // Like jinja2: a string that is not an int may still be a float ("1.5" | int == 1).
    const bool float_syntax =
        !cleaned.empty() && cleaned.find_first_of("xXpP") == std::string::npos &&
        std::all_of(cleaned.begin(), cleaned.end(), [](char c) { return c > ' ' && c < 0x7F; });
    if (float_syntax) {
      char* end = nullptr;
      const double parsed = std::strtod(cleaned.c_str(), &end);
      if (end != cleaned.c_str() && *end == '\0') {
        if (!to_int) return Value::Float(parsed);
        if (std::isfinite(parsed) && std::fabs(parsed) < 9.2e18)
          return Value::Int(static_cast<int64_t>(parsed));
      }
    }
    return fallback;
  }

  absl::StatusOr<Value> MapFilter(const Value& value, const Arguments& args) {
    ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
    std::vector<Value> mapped;
    const std::pair<std::string, Value>* attribute = nullptr;
    const std::pair<std::string, Value>* default_value = nullptr;
    for (const auto& kw : args.keyword) {
      if (kw.first == "attribute")
        attribute = &kw;
      else if (kw.first == "default")
        default_value = &kw;
    }
    if (attribute != nullptr) {
      ASSIGN_OR_RETURN(std::string path, ToStr(attribute->second));
      for (const Value& item : items) {
        RETURN_IF_ERROR(Step());
        ASSIGN_OR_RETURN(Value v, GetAttributePath(item, path));
        mapped.push_back(v.is_undefined() && default_value != nullptr ? default_value->second : v);
      }
      return NewList(Value::Kind::kList, std::move(mapped));
    }
    if (args.positional.empty()) return Error("map requires a filter argument");
    ASSIGN_OR_RETURN(std::string filter, ToStr(args.positional[0]));
    if (!IsKnownFilter(filter)) return Error(absl::StrCat("No filter named '", filter, "'."));
    Arguments filter_args;
    filter_args.positional.assign(args.positional.begin() + 1, args.positional.end());
    filter_args.keyword = args.keyword;
    for (const Value& item : items) {
      RETURN_IF_ERROR(Step());
      ASSIGN_OR_RETURN(Value v, ApplyFilter(filter, item, filter_args));
      mapped.push_back(std::move(v));
    }
    return NewList(Value::Kind::kList, std::move(mapped));
  }

  // transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None,
  // sort_keys=False).
  absl::StatusOr<Value> ToJson(const Value& value, const Arguments& args) {
    ASSIGN_OR_RETURN(auto bound,
                     args.Bind("tojson", {"ensure_ascii", "indent", "separators", "sort_keys"}));
    JsonOptions options;
    options.max_bytes = limits_.max_output_bytes;
    options.ensure_ascii = bound[0].has_value() && Truthy(*bound[0]);
    options.sort_keys = bound[3].has_value() && Truthy(*bound[3]);
    if (bound[1].has_value() && bound[1]->kind != Value::Kind::kNone) {
      if (IsInt(*bound[1])) {
        options.indent.emplace(static_cast<size_t>(std::clamp<int64_t>(AsInt(*bound[1]), 0, 64)),
                               ' ');
      } else if (bound[1]->is_string()) {
        options.indent = bound[1]->text;
      } else {
        return Error(absl::StrCat("indent must be an int or a str, not ", TypeName(*bound[1])));
      }
      options.item_separator = ",";
    }
    if (bound[2].has_value() && bound[2]->kind != Value::Kind::kNone) {
      const Value& separators = *bound[2];
      if (!separators.is_sequence() || separators.list->items.size() != 2 ||
          !separators.list->items[0].is_string() || !separators.list->items[1].is_string()) {
        return Error("separators must be a pair of strings");
      }
      options.item_separator = separators.list->items[0].text;
      options.key_separator = separators.list->items[1].text;
    }
    std::string out;
    RETURN_IF_ERROR(JsonDump(value, options, 0, limits_.max_depth, out));
    if (out.size() > limits_.max_output_bytes)
      return Error("tojson output too large (max_output_bytes)");
    return Value::String(std::move(out));
  }

  // ----- tests ------------------------------------------------------------------------

  absl::StatusOr<bool> ApplyTest(const std::string& name, const Value& value,
                                 const Arguments& args) {
    const Value::Kind kind = value.kind;
    if (name == "defined") return !value.is_undefined();
    if (name == "undefined") return value.is_undefined();
    if (name == "none") return kind == Value::Kind::kNone;
    if (name == "string") return value.is_string();
    if (name == "number") return value.is_number();
    if (name == "integer") return kind == Value::Kind::kInt;
    if (name == "float") return kind == Value::Kind::kFloat;
    if (name == "boolean") return kind == Value::Kind::kBool;
    if (name == "true") return kind == Value::Kind::kBool && value.boolean;
    if (name == "false") return kind == Value::Kind::kBool && !value.boolean;
    if (name == "mapping") return kind == Value::Kind::kDict;
    if (name == "iterable" || name == "sequence") {
      return value.is_undefined() || value.is_string() || value.is_sequence() ||
             kind == Value::Kind::kDict;
    }
    if (name == "callable") return value.is_undefined() || kind == Value::Kind::kCallable;
    if (name == "lower" || name == "upper") {
      ASSIGN_OR_RETURN(std::string text, ToStr(value));
      return IsLowerOrUpper(text, name == "upper");
    }
    if (name == "even" || name == "odd" || name == "divisibleby") {
      Value divisor = Value::Int(2);
      if (name == "divisibleby") {
        ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"num"}));
        if (!bound[0].has_value()) return Error("divisibleby() missing required argument 'num'");
        divisor = *bound[0];
      }
      ASSIGN_OR_RETURN(Value remainder,
                       Arithmetic(BinaryOp::kMod, value, divisor, limits_.max_output_bytes));
      const bool zero = Equal(remainder, Value::Int(0));
      return name == "odd" ? !zero : zero;
    }
    static constexpr std::pair<std::string_view, CompareOp> kComparisons[] = {
        {"equalto", CompareOp::kEq}, {"eq", CompareOp::kEq}, {"==", CompareOp::kEq},
        {"ne", CompareOp::kNe},      {"!=", CompareOp::kNe}, {"lt", CompareOp::kLt},
        {"<", CompareOp::kLt},       {"le", CompareOp::kLe}, {"<=", CompareOp::kLe},
        {"gt", CompareOp::kGt},      {">", CompareOp::kGt},  {"ge", CompareOp::kGe},
        {">=", CompareOp::kGe},      {"in", CompareOp::kIn}};
    for (const auto& [test_name, op] : kComparisons) {
      if (name != test_name) continue;
      ASSIGN_OR_RETURN(auto bound, args.Bind(name, {"other"}));
      if (!bound[0].has_value())
        return Error(absl::StrCat(name, "() missing required argument 'other'"));
      return Compare(value, *bound[0], op);
    }
    return Error(absl::StrCat("No test named '", name, "'."));
  }

  const ChatTemplateLimits& limits_;
  std::shared_ptr<Scope> root_;
  std::vector<std::shared_ptr<Dict>> namespaces_;
  size_t steps_ = 0;
  int depth_ = 0;
};

}  // namespace
}  // namespace chat_template_internal

ChatTemplate::ChatTemplate(std::unique_ptr<chat_template_internal::Program> program)
    : program_(std::move(program)) {}
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  ASSIGN_OR_RETURN(auto program, chat_template_internal::ParseProgram(source));
  return ChatTemplate(std::move(program));
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context,
                                                 const ChatTemplateLimits& limits) const {
  chat_template_internal::Renderer renderer(limits);
  return renderer.Render(*program_, context);
}

}  // namespace moe
