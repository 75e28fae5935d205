// Chat templates: byte-for-byte equality with transformers' apply_chat_template (jinja2) on
// the goldens of tests/reference/make_chat_template_goldens.py, parse errors that name the
// line and column, the render limits and the sandbox.
#include "engine/tokenizer/chat_template.h"

#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using ::testing::HasSubstr;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string FixtureDir() { return std::string(MOE_SOURCE_DIR) + "/tests/fixtures/chat_templates/"; }

absl::StatusOr<std::string> RenderSource(std::string_view source,
                                         const nlohmann::ordered_json& context,
                                         const ChatTemplateLimits& limits = {}) {
  auto parsed = ChatTemplate::Parse(source);
  if (!parsed.ok()) return parsed.status();
  return parsed->Render(context, limits);
}

TEST(ChatTemplateGoldenTest, MatchesJinja2OnEveryCase) {
  const std::string text = ReadFile(FixtureDir() + "goldens.json");
  const auto goldens = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  ASSERT_TRUE(goldens.is_array()) << "goldens.json missing or invalid";
  ASSERT_GE(goldens.size(), 60u);
  int published = 0;
  for (const auto& golden : goldens) {
    const std::string name = golden["template"].get<std::string>();
    const std::string source = golden.contains("source") ? golden["source"].get<std::string>()
                                                         : ReadFile(FixtureDir() + name);
    SCOPED_TRACE(name + " with " + golden["context"].dump().substr(0, 300));
    const absl::StatusOr<std::string> rendered = RenderSource(source, golden["context"]);
    if (golden.contains("expected")) {
      ASSERT_TRUE(rendered.ok()) << rendered.status();
      EXPECT_EQ(*rendered, golden["expected"].get<std::string>());
    } else {
      ASSERT_FALSE(rendered.ok()) << "rendered: " << *rendered;
      EXPECT_EQ(rendered.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(rendered.status().message(),
                  HasSubstr(golden["error_contains"].get<std::string>()));
    }
    if (!golden.contains("source")) ++published;
  }
  EXPECT_GE(published, 40);
}

TEST(ChatTemplateTest, QwenChatMlDefaultSystemMessage) {
  const std::string source = ReadFile(FixtureDir() + "qwen2_moe_chatml.jinja");
  nlohmann::ordered_json context = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                                    {"add_generation_prompt", true}};
  auto rendered = RenderSource(source, context);
  ASSERT_TRUE(rendered.ok()) << rendered.status();
  EXPECT_EQ(
      *rendered,
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, RaiseExceptionCarriesTheMessage) {
  auto rendered = RenderSource("{{ raise_exception('roles must alternate') }}",
                               nlohmann::ordered_json::object());
  ASSERT_FALSE(rendered.ok());
  EXPECT_EQ(rendered.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rendered.status().message(), "chat template: roles must alternate");
}

struct ParseErrorCase {
  std::string source;
  std::string position;
  std::string what;
};

TEST(ChatTemplateParseTest, ErrorsNameLineAndColumn) {
  const ParseErrorCase cases[] = {
      {"ab\n  {{ x ", "line 2, column 8",
       "unexpected end of template, expected 'end of print statement'"},
      {"{% if x %}\n{% frob %}", "line 2, column 4", "Encountered unknown tag 'frob'."},
      {"{% for x in y %}\nabc", "line 2, column 4",
       "Jinja was looking for the following tags: 'endfor' or 'else'"},
      {"x\n{{ 1 + }}", "line 2, column 8", "unexpected 'end of print statement'"},
      {"{{ (1 ]] }}", "line 1, column 7", "unexpected ']', expected ')'"},
      {"{# never closed", "line 1, column 1", "Missing end of comment tag"},
      {"{{ 'unterminated }}", "line 1, column 4", "unexpected char"},
      {"{% set x = 1 2 %}", "line 1, column 14",
       "expected token 'end of statement block', got 'integer'"},
      {"{{ x | nosuch }}", "line 1, column 8", "No filter named 'nosuch'."},
      {"{% break %}", "line 1, column 4", "'break' outside of a loop"},
      {"{{ 99999999999999999999 }}", "line 1, column 4", "integer literal too large"},
      {"{% if %}{% endif %}", "line 1, column 7", "Expected an expression"},
      {"\xff{{ x }}", "line 1, column 1", "not valid UTF-8"},
      // Found by the fuzzer: a slice in a tuple subscript (was a null dereference).
      {"{{ (1, 2)[:,-1] }}", "line 1, column 11", "a slice inside a tuple subscript"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.source);
    auto parsed = ChatTemplate::Parse(c.source);
    ASSERT_FALSE(parsed.ok());
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(parsed.status().message(), HasSubstr("chat template " + c.position + ": "));
    EXPECT_THAT(parsed.status().message(), HasSubstr(c.what));
  }
}

TEST(ChatTemplateParseTest, DeepNestingIsRefusedNotRecursed) {
  const std::string source = "{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}";
  auto parsed = ChatTemplate::Parse(source);
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(parsed.status().message(), HasSubstr("nesting too deep"));
  std::string blocks;
  for (int i = 0; i < 5000; ++i) blocks += "{% if x %}";
  EXPECT_FALSE(ChatTemplate::Parse(blocks).ok());
}

TEST(ChatTemplateRenderTest, RenderErrorsNameLineAndColumn) {
  auto rendered = RenderSource("line one\n  {{ 1 + 'a' }}", nlohmann::ordered_json::object());
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(),
              HasSubstr("chat template line 2, column 8: unsupported operand"));
  rendered = RenderSource("{% if true %}\n{{ missing.attr }}{% endif %}",
                          nlohmann::ordered_json::object());
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(), HasSubstr("line 2, column 11: 'missing' is undefined"));
}

TEST(ChatTemplateRenderTest, StepsLimitStopsLongLoops) {
  const std::string source =
      "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}";
  ChatTemplateLimits limits;
  limits.max_steps = 1'000'000;
  auto rendered = RenderSource(source, nlohmann::ordered_json::object(), limits);
  ASSERT_FALSE(rendered.ok());
  EXPECT_EQ(rendered.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(rendered.status().message(), HasSubstr("max_steps"));
}

TEST(ChatTemplateRenderTest, OutputLimitStopsHugeOutput) {
  ChatTemplateLimits limits;
  limits.max_output_bytes = 1000;
  auto rendered = RenderSource("{% for i in range(1000) %}0123456789{% endfor %}",
                               nlohmann::ordered_json::object(), limits);
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(), HasSubstr("max_output_bytes"));
  // String repetition is checked before the string is built.
  rendered =
      RenderSource("{% set s = 'x' * 100000000000 %}", nlohmann::ordered_json::object(), limits);
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(), HasSubstr("max_output_bytes"));
}

TEST(ChatTemplateRenderTest, DepthLimitStopsDeepRecursion) {
  auto rendered = RenderSource("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                               nlohmann::ordered_json::object());
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(), HasSubstr("max_depth"));
  // Nesting built up in a loop is refused before printing or freeing it could recurse deeply.
  rendered = RenderSource(
      "{% set ns = namespace(v=[]) %}{% for i in range(100000) %}{% set ns.v = [ns.v] %}{% endfor "
      "%}{{ ns.v }}",
      nlohmann::ordered_json::object());
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(), HasSubstr("nested too deeply"));
}

TEST(ChatTemplateRenderTest, SelfReferencingNamespaceDoesNotHangOrLeak) {
  auto rendered = RenderSource("{% set ns = namespace() %}{% set ns.self = ns %}{{ ns }}",
                               nlohmann::ordered_json::object());
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(), HasSubstr("nested too deeply"));
}

TEST(ChatTemplateRenderTest, ImmutableSandboxRefusesMutation) {
  for (const char* source : {"{% set l = [1] %}{{ l.append(2) }}", "{{ messages.pop() }}",
                             "{% set d = {'a': 1} %}{{ d.clear() }}"}) {
    SCOPED_TRACE(source);
    auto rendered = RenderSource(source, {{"messages", nlohmann::ordered_json::array()}});
    ASSERT_FALSE(rendered.ok());
    EXPECT_THAT(rendered.status().message(), HasSubstr("is unsafe"));
  }
}

TEST(ChatTemplateRenderTest, IntegerOverflowIsAnError) {
  for (const char* source :
       {"{{ 9223372036854775807 + 1 }}", "{{ 2 ** 64 }}", "{{ -(-9223372036854775807 - 1) }}",
        "{{ 3037000500 * 3037000500 }}"}) {
    SCOPED_TRACE(source);
    auto rendered = RenderSource(source, nlohmann::ordered_json::object());
    ASSERT_FALSE(rendered.ok());
    EXPECT_THAT(rendered.status().message(), HasSubstr("integer overflow"));
  }
}

TEST(ChatTemplateRenderTest, BadContextIsRefused) {
  auto parsed = ChatTemplate::Parse("{{ x }}");
  ASSERT_TRUE(parsed.ok());
  EXPECT_FALSE(parsed->Render(nlohmann::ordered_json::array()).ok());
  nlohmann::ordered_json context = {{"x", std::string("\xff\xfe")}};
  auto rendered = parsed->Render(context);
  ASSERT_FALSE(rendered.ok());
  EXPECT_THAT(rendered.status().message(), HasSubstr("not valid UTF-8"));
  nlohmann::ordered_json deep = 1;
  for (int i = 0; i < 1000; ++i) deep = nlohmann::ordered_json::array({deep});
  EXPECT_FALSE(parsed->Render({{"x", deep}}).ok());
}

TEST(ChatTemplateRenderTest, TemplateIsReusableAndMovable) {
  auto parsed = ChatTemplate::Parse("{{ x }}!");
  ASSERT_TRUE(parsed.ok());
  ChatTemplate moved = std::move(*parsed);
  EXPECT_EQ(*moved.Render({{"x", 1}}), "1!");
  EXPECT_EQ(*moved.Render({{"x", "two"}}), "two!");
}

}  // namespace
}  // namespace moe
