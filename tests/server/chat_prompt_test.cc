// Chat prompts through the server: GenerateRequest.chat and TokenizeRequest.chat rendered by
// the model directory's chat template (chat_template.jinja or tokenizer_config.json), encoded
// with the special tokens the template writes; the request checks and the template's own
// refusals as INVALID_ARGUMENT; a model without a usable template as FAILED_PRECONDITION. The
// renderer itself is checked against jinja2 in tests/tokenizer/chat_template_test.cc.
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/request_validation.h"
#include "tests/server/server_test_util.h"

namespace moe::server::testing {
namespace {

using ::testing::HasSubstr;

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string ChatTemplateFixture(const std::string& name) {
  return std::string(MOE_SOURCE_DIR) + "/tests/fixtures/chat_templates/" + name;
}

// The demo model's files, linked into a directory of its own, plus the Qwen2-MoE ChatML chat
// template (with its default system message) as chat_template.jinja.
const std::string& ChatModelDir() {
  static const std::string dir = [] {
    const std::filesystem::path out =
        std::filesystem::temp_directory_path() / absl::StrCat("moe_chat_test_", ::getpid());
    std::filesystem::create_directories(out);
    for (const char* name : {"config.json", "model.safetensors", "tokenizer.json"}) {
      std::filesystem::create_symlink(std::filesystem::path(DemoModelDir()) / name, out / name);
    }
    std::filesystem::copy_file(ChatTemplateFixture("qwen2_moe_chatml.jinja"),
                               out / "chat_template.jinja");
    return out.string();
  }();
  return dir;
}

v1::ChatMessage Message(const std::string& role, const std::string& content) {
  v1::ChatMessage message;
  message.set_role(role);
  message.set_content(content);
  return message;
}

class ChatServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ServerOptions options = TestOptions();
    options.model_dir = ChatModelDir();
    server_ = TestServer::Start(options).release();
    tokenizer_ = Tokenizer::FromModelDir(ChatModelDir())->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    delete tokenizer_;
    std::error_code error;
    std::filesystem::remove_all(ChatModelDir(), error);
    RemoveDemoModel();
  }

  static v1::ChatPrompt Conversation() {
    v1::ChatPrompt chat;
    *chat.add_messages() = Message("user", "Which expert?");
    *chat.add_messages() = Message("assistant", "The second.");
    *chat.add_messages() = Message("user", "Why?");
    return chat;
  }

  static v1::TokenizeResponse Tokenize(const v1::ChatPrompt& chat, grpc::Status* status) {
    v1::TokenizeRequest request;
    *request.mutable_chat() = chat;
    request.set_return_pieces(true);
    v1::TokenizeResponse response;
    grpc::ClientContext context;
    *status = server_->stub->Tokenize(&context, request, &response);
    return response;
  }

  static TestServer* server_;
  static Tokenizer* tokenizer_;
};
TestServer* ChatServerTest::server_ = nullptr;
Tokenizer* ChatServerTest::tokenizer_ = nullptr;

constexpr char kRenderedConversation[] =
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhich expert?<|im_end|>\n"
    "<|im_start|>assistant\nThe second.<|im_end|>\n"
    "<|im_start|>user\nWhy?<|im_end|>\n"
    "<|im_start|>assistant\n";

TEST_F(ChatServerTest, ModelInfoSaysChatIsServed) {
  EXPECT_TRUE(server_->server->model_info().has_chat_template());
}

TEST_F(ChatServerTest, TokenizeReturnsTheRenderedPromptAndItsTokensWithSpecialTokens) {
  grpc::Status status;
  const v1::TokenizeResponse response = Tokenize(Conversation(), &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.chat_text(), kRenderedConversation);
  EncodeOptions options;
  options.add_special_tokens = false;
  options.parse_special_tokens = true;
  const std::vector<int32_t> expected = *tokenizer_->Encode(kRenderedConversation, options);
  EXPECT_EQ(std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end()),
            expected);
  // The markers are single special tokens, not their characters.
  const int32_t im_start = *tokenizer_->TokenToId("<|im_start|>");
  EXPECT_EQ(response.token_ids(0), im_start);
  EXPECT_EQ(std::count(response.token_ids().begin(), response.token_ids().end(), im_start), 5);
  EXPECT_EQ(response.pieces(0), "<|im_start|>");

  v1::ChatPrompt without_prompt = Conversation();
  without_prompt.set_add_generation_prompt(false);
  const v1::TokenizeResponse ended = Tokenize(without_prompt, &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(ended.chat_text(), std::string(kRenderedConversation)
                                   .substr(0, std::string(kRenderedConversation).size() -
                                                  std::string("<|im_start|>assistant\n").size()));
}

TEST_F(ChatServerTest, GenerateFromChatEqualsGenerateFromTheRenderedTokens) {
  grpc::Status status;
  const v1::TokenizeResponse tokenized = Tokenize(Conversation(), &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  const std::vector<int32_t> prompt(tokenized.token_ids().begin(), tokenized.token_ids().end());

  v1::GenerateRequest chat_request = GreedyRequest({}, 6);
  chat_request.clear_token_ids();
  *chat_request.mutable_chat() = Conversation();
  const StreamResult from_chat = RunGenerate(*server_->stub, chat_request);
  ASSERT_TRUE(from_chat.status.ok()) << from_chat.status.error_message();
  const StreamResult from_ids = RunGenerate(*server_->stub, GreedyRequest(prompt, 6));
  ASSERT_TRUE(from_ids.status.ok()) << from_ids.status.error_message();
  EXPECT_EQ(from_chat.tokens, from_ids.tokens);
  EXPECT_EQ(from_chat.tokens.size(), 6u);
  EXPECT_EQ(from_chat.last.usage().prompt_tokens(), static_cast<int32_t>(prompt.size()));
}

TEST_F(ChatServerTest, BadChatRequestsAreInvalidAndNameTheField) {
  struct Case {
    std::string what;
    v1::ChatPrompt chat;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({"no messages", v1::ChatPrompt(), "chat.messages: 0 messages is not allowed"});
  {
    v1::ChatPrompt chat = Conversation();
    chat.mutable_messages(1)->set_role("");
    cases.push_back({"empty role", chat, "chat.messages[1].role: '' is not allowed"});
  }
  {
    v1::ChatPrompt chat = Conversation();
    (*chat.mutable_template_variables())["enable_thinking"] = "fals";
    cases.push_back({"not JSON", chat, "chat.template_variables[enable_thinking]: 'fals'"});
  }
  {
    v1::ChatPrompt chat = Conversation();
    (*chat.mutable_template_variables())["messages"] = "[]";
    cases.push_back({"reserved", chat, "are set by the server"});
  }
  {
    v1::ChatPrompt chat = Conversation();
    (*chat.mutable_template_variables())["two words"] = "1";
    cases.push_back({"not a name", chat, "names are identifiers"});
  }
  {
    v1::ChatPrompt chat = Conversation();
    (*chat.mutable_template_variables())["deep"] = std::string(40, '[') + std::string(40, ']');
    cases.push_back({"too deep", chat, "nested at most 32 deep"});
  }
  for (const Case& c : cases) {
    v1::GenerateRequest request = GreedyRequest({}, 2);
    request.clear_token_ids();
    *request.mutable_chat() = c.chat;
    const StreamResult result = RunGenerate(*server_->stub, request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.what;
    EXPECT_THAT(result.status.error_message(), HasSubstr(c.message)) << c.what;
    grpc::Status status;
    Tokenize(c.chat, &status);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.what;
  }
  // Text and chat together in a Tokenize call.
  v1::TokenizeRequest both;
  both.set_text("x");
  *both.mutable_chat() = Conversation();
  v1::TokenizeResponse response;
  grpc::ClientContext context;
  const grpc::Status status = server_->stub->Tokenize(&context, both, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("not allowed together with chat"));
  // The server goes on serving.
  EXPECT_TRUE(RunGenerate(*server_->stub, GreedyRequest({1, 2, 3}, 2)).status.ok());
}

// separate_reasoning: a prompt that ends with <think> (as Qwen3's thinking templates end it)
// puts the whole output in reasoning_text while no </think> comes; a prompt that does not
// leaves it in text. Either way the pieces are the output of the same request without it.
TEST_F(ChatServerTest, SeparateReasoningSplitsTheOutputAtTheThinkBlock) {
  for (const bool opened : {true, false}) {
    SCOPED_TRACE(opened ? "prompt opens the block" : "no block");
    v1::GenerateRequest request = GreedyRequest({}, 12);
    request.clear_token_ids();
    request.set_text(opened ? "Why two experts?<think>\n" : "Why two experts?");
    const StreamResult plain = RunGenerate(*server_->stub, request);
    ASSERT_TRUE(plain.status.ok()) << plain.status.error_message();
    ASSERT_FALSE(plain.text.empty());
    ASSERT_EQ(plain.text.find("</think>"), std::string::npos);
    request.set_separate_reasoning(true);
    const StreamResult split = RunGenerate(*server_->stub, request);
    ASSERT_TRUE(split.status.ok()) << split.status.error_message();
    std::string reasoning;
    for (const v1::GenerateResponse& response : split.responses) {
      reasoning += response.reasoning_text();
    }
    EXPECT_EQ(split.tokens, plain.tokens);
    EXPECT_EQ(opened ? reasoning : split.text, plain.text);
    EXPECT_TRUE(opened ? split.text.empty() : reasoning.empty());
  }
}

// ---- EncodeChatPrompt with tokenizers built in the test --------------------------------------

RequestLimits Limits() {
  return RequestLimits{.vocab_size = 1 << 20,
                       .context_length = 1 << 16,
                       .max_prompt_tokens = 1 << 15,
                       .max_prompt_text_bytes = int64_t{1} << 21};
}

std::unique_ptr<Tokenizer> TokenizerWithConfig(const nlohmann::json& config) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      Tokenizer::FromJson(ReadText(TokenizerFixture()), config.dump());
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

TEST(EncodeChatPromptTest, TheTemplatesOwnRefusalIsInvalidArgumentWithItsMessage) {
  const std::unique_ptr<Tokenizer> tokenizer = TokenizerWithConfig(
      {{"bos_token", "<|endoftext|>"},
       {"eos_token", "<|endoftext|>"},
       {"chat_template", ReadText(ChatTemplateFixture("mixtral_8x7b_instruct.jinja"))}});
  ASSERT_NE(tokenizer, nullptr);
  ASSERT_TRUE(tokenizer->chat_template_status().ok()) << tokenizer->chat_template_status();
  v1::ChatPrompt chat;
  *chat.add_messages() = Message("user", "a");
  *chat.add_messages() = Message("user", "b");
  absl::StatusOr<EncodedChat> refused = EncodeChatPrompt(chat, tokenizer.get(), Limits());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("roles must alternate"));
  EXPECT_THAT(refused.status().message(), HasSubstr("chat: "));

  chat.mutable_messages(1)->set_role("assistant");
  *chat.add_messages() = Message("user", "c");
  absl::StatusOr<EncodedChat> accepted = EncodeChatPrompt(chat, tokenizer.get(), Limits());
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  // bos_token and eos_token come from tokenizer_config.json.
  EXPECT_EQ(accepted->text, "<|endoftext|> [INST] a [/INST] b<|endoftext|> [INST] c [/INST]");
  EXPECT_EQ(accepted->token_ids.front(), *tokenizer->TokenToId("<|endoftext|>"));
}

TEST(EncodeChatPromptTest, TemplateVariablesReachTheTemplateAsJsonValues) {
  const std::unique_ptr<Tokenizer> tokenizer = TokenizerWithConfig(
      {{"chat_template",
        "{% if think is false %}no{% endif %}|{{ tools | length }}|{{ tools[1].name }}|"
        "{{ messages | length }}{% if add_generation_prompt %}+{% endif %}"}});
  ASSERT_NE(tokenizer, nullptr);
  v1::ChatPrompt chat;
  *chat.add_messages() = Message("user", "a");
  (*chat.mutable_template_variables())["think"] = "false";
  (*chat.mutable_template_variables())["tools"] = R"([{"name": "f"}, {"name": "g"}])";
  absl::StatusOr<EncodedChat> encoded = EncodeChatPrompt(chat, tokenizer.get(), Limits());
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->text, "no|2|g|1+");
}

// Expected texts: transformers 4.57.1's render_jinja_template(..., continue_final_message=True,
// add_generation_prompt=False) on the same templates and messages.
TEST(EncodeChatPromptTest, ContinueFinalMessageEndsInsideTheLastMessageAsTransformersDoes) {
  const std::unique_ptr<Tokenizer> qwen = TokenizerWithConfig(
      {{"chat_template", ReadText(ChatTemplateFixture("qwen2_moe_chatml.jinja"))}});
  const std::unique_ptr<Tokenizer> mistral = TokenizerWithConfig(
      {{"bos_token", "<|endoftext|>"},
       {"eos_token", "<|endoftext|>"},
       {"chat_template", ReadText(ChatTemplateFixture("mixtral_8x7b_instruct.jinja"))}});
  v1::ChatPrompt chat;
  *chat.add_messages() = Message("user", "Name an expert.");
  *chat.add_messages() = Message("assistant", "The expert  ");
  chat.set_continue_final_message(true);
  absl::StatusOr<EncodedChat> from_qwen = EncodeChatPrompt(chat, qwen.get(), Limits());
  ASSERT_TRUE(from_qwen.ok()) << from_qwen.status();
  EXPECT_EQ(from_qwen->text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName "
            "an expert.<|im_end|>\n<|im_start|>assistant\nThe expert  ");
  absl::StatusOr<EncodedChat> from_mistral = EncodeChatPrompt(chat, mistral.get(), Limits());
  ASSERT_TRUE(from_mistral.ok()) << from_mistral.status();
  EXPECT_EQ(from_mistral->text, "<|endoftext|> [INST] Name an expert. [/INST] The expert  ");

  // A template that trims the content: the spacing before the cut goes too.
  const std::unique_ptr<Tokenizer> trimming = TokenizerWithConfig(
      {{"chat_template", "{% for m in messages %}<{{ m.content | trim }}>{% endfor %}"}});
  absl::StatusOr<EncodedChat> trimmed = EncodeChatPrompt(chat, trimming.get(), Limits());
  ASSERT_TRUE(trimmed.ok()) << trimmed.status();
  EXPECT_EQ(trimmed->text, "<Name an expert.><The expert");

  // Not with add_generation_prompt; not when the template drops the content.
  chat.set_add_generation_prompt(true);
  EXPECT_THAT(EncodeChatPrompt(chat, qwen.get(), Limits()).status().message(),
              HasSubstr("exclude each other"));
  chat.clear_add_generation_prompt();
  const std::unique_ptr<Tokenizer> cutting = TokenizerWithConfig(
      {{"chat_template", "{% for m in messages %}{{ m.content[:3] }}{% endfor %}"}});
  absl::StatusOr<EncodedChat> cut = EncodeChatPrompt(chat, cutting.get(), Limits());
  EXPECT_EQ(cut.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(cut.status().message(), HasSubstr("does not write the last message's content"));
}

TEST(EncodeChatPromptTest, WithoutAUsableTemplateChatIsAFailedPrecondition) {
  v1::ChatPrompt chat;
  *chat.add_messages() = Message("user", "a");
  absl::StatusOr<EncodedChat> no_tokenizer = EncodeChatPrompt(chat, nullptr, Limits());
  EXPECT_EQ(no_tokenizer.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(no_tokenizer.status().message(), HasSubstr("no tokenizer.json"));

  const std::unique_ptr<Tokenizer> no_template = TokenizerWithConfig(nlohmann::json::object());
  absl::StatusOr<EncodedChat> none = EncodeChatPrompt(chat, no_template.get(), Limits());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(none.status().message(), HasSubstr("has no chat template"));

  // A template that does not parse leaves the tokenizer usable and says why chat is not.
  const std::unique_ptr<Tokenizer> broken =
      TokenizerWithConfig({{"chat_template", "{% for m in messages %}{{ m.content }}"}});
  ASSERT_NE(broken, nullptr);
  EXPECT_TRUE(broken->Encode("hello").ok());
  absl::StatusOr<EncodedChat> unparsed = EncodeChatPrompt(chat, broken.get(), Limits());
  EXPECT_EQ(unparsed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(unparsed.status().message(), HasSubstr("is not supported"));

  // transformers' named templates: the "default" one is used.
  const std::unique_ptr<Tokenizer> named = TokenizerWithConfig(
      {{"chat_template",
        {{{"name", "tool_use"}, {"template", "T"}}, {{"name", "default"}, {"template", "D"}}}}});
  absl::StatusOr<EncodedChat> by_name = EncodeChatPrompt(chat, named.get(), Limits());
  ASSERT_TRUE(by_name.ok()) << by_name.status();
  EXPECT_EQ(by_name->text, "D");
  const std::unique_ptr<Tokenizer> no_default =
      TokenizerWithConfig({{"chat_template", {{{"name", "tool_use"}, {"template", "T"}}}}});
  EXPECT_THAT(no_default->chat_template_status().message(), HasSubstr("none 'default'"));
}

TEST(SeparateReasoningTest, NeedsATokenizer) {
  v1::GenerateRequest request = GreedyRequest({1, 2, 3}, 4);
  request.set_separate_reasoning(true);
  absl::StatusOr<GenerateRequest> refused = BuildEngineRequest(request, nullptr, Limits());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr("separate_reasoning: "));
}

}  // namespace
}  // namespace moe::server::testing
