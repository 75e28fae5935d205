// Limits on what a client controls beyond the per-field checks of server_e2e_test (message
// size, Detokenize length, the raw-bytes validation path the fuzzer drives), bearer-token
// authentication in process, and regression inputs found by the fuzzers (fuzz/).
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/auth.h"
#include "server/request_validation.h"
#include "tests/server/server_test_util.h"

namespace moe::server::testing {
namespace {

using ::testing::HasSubstr;

// ---- Limits ---------------------------------------------------------------------------------

class LimitsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ServerOptions options = TestOptions();
    options.max_message_bytes = 64 << 10;
    server_ = TestServer::Start(options).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static TestServer* server_;
};
TestServer* LimitsTest::server_ = nullptr;

TEST_F(LimitsTest, MessageBeyondTheReceiveLimitIsRefusedByGrpc) {
  v1::GenerateRequest request = GreedyRequest({1, 2, 3}, 4);
  request.mutable_stop()->add_stop_strings(std::string(100 << 10, 'a'));  // > 64 KiB
  const StreamResult result = RunGenerate(*server_->stub, request);
  // gRPC's own code for a message over the limit, before the service sees it.
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << result.status.error_message();
  EXPECT_TRUE(result.responses.empty());
  // The server goes on serving.
  EXPECT_TRUE(RunGenerate(*server_->stub, GreedyRequest({1, 2, 3}, 4)).status.ok());
}

TEST_F(LimitsTest, DetokenizeBeyondTheContextLengthIsInvalid) {
  const int32_t context = server_->server->model_info().context_length();
  v1::DetokenizeRequest request;
  for (int32_t i = 0; i <= context; ++i) request.add_token_ids(5);
  v1::DetokenizeResponse response;
  grpc::ClientContext context_too_long;
  grpc::Status status = server_->stub->Detokenize(&context_too_long, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr(absl::StrCat(context + 1, " ids")));
  request.mutable_token_ids()->RemoveLast();
  grpc::ClientContext context_ok;
  EXPECT_TRUE(server_->stub->Detokenize(&context_ok, request, &response).ok());
}

TEST(RequestValidationTest, RawBytesPathParsesAndValidates) {
  RequestLimits limits{.vocab_size = 100,
                       .context_length = 32,
                       .max_prompt_tokens = 16,
                       .max_prompt_text_bytes = 16 * kMaxPromptBytesPerToken};
  v1::GenerateRequest request = GreedyRequest({1, 2, 3}, 4);
  v1::GenerateRequest parsed;
  absl::StatusOr<GenerateRequest> built =
      ParseGenerateRequest(request.SerializeAsString(), nullptr, limits, &parsed);
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->prompt_token_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(built->sampling.max_tokens, 4);
  EXPECT_EQ(parsed.token_ids().ids_size(), 3);

  // Not a protobuf message at all.
  absl::StatusOr<GenerateRequest> garbage = ParseGenerateRequest("\xff\xff\xff", nullptr, limits);
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(garbage.status().message(), HasSubstr("not a valid moe.serving.v1.GenerateRequest"));
  // Invalid UTF-8 in stop.stop_strings[1], named by the parse-failure diagnosis.
  const std::string bad_stop = std::string("\x32\x06\x2a\x01x\x2a\x01\xff", 8);
  absl::StatusOr<GenerateRequest> utf8 =
      ParseGenerateRequest(request.SerializeAsString() + bad_stop, nullptr, limits);
  EXPECT_EQ(utf8.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(utf8.status().message(), HasSubstr("stop.stop_strings[1]: invalid UTF-8 at byte 0"));
  // Text prompts are bounded in bytes before they are encoded.
  v1::GenerateRequest text;
  text.set_text(std::string(16 * kMaxPromptBytesPerToken + 1, 'a'));
  absl::StatusOr<GenerateRequest> long_text =
      ParseGenerateRequest(text.SerializeAsString(), nullptr, limits);
  EXPECT_EQ(long_text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(long_text.status().message(), HasSubstr("1025 bytes is too long"));
}

// ---- Bearer tokens --------------------------------------------------------------------------

TEST(BearerAuthTest, ConstantTimeEqualsIsEquality) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secreT"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secretsecret"));  // a repeat is not a match
  EXPECT_FALSE(ConstantTimeEquals("secretsecret", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("", "x"));
  EXPECT_FALSE(ConstantTimeEquals("x", ""));
}

TEST(BearerAuthTest, ChecksSchemeAndToken) {
  absl::StatusOr<BearerAuth> auth = BearerAuth::Create({"alpha", "beta-2"});
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE(auth->Check("Bearer alpha"));
  EXPECT_TRUE(auth->Check("bearer beta-2"));
  EXPECT_FALSE(auth->Check("Bearer "));
  EXPECT_FALSE(auth->Check("Bearer alph"));
  EXPECT_FALSE(auth->Check("Bearer alphaa"));
  EXPECT_FALSE(auth->Check("Basic alpha"));
  EXPECT_FALSE(auth->Check("alpha"));
  EXPECT_FALSE(auth->Check(""));
  EXPECT_FALSE(BearerAuth::Create({}).ok());
  EXPECT_FALSE(BearerAuth::Create({""}).ok());
}

TEST(BearerAuthTest, LoadsTokensFromFileAndList) {
  const std::string path =
      (std::filesystem::temp_directory_path() / absl::StrCat("moe_tokens_", ::getpid())).string();
  {
    std::ofstream out(path);
    out << "# clients\n\n  tok-one  \ntok-two\n";
  }
  absl::StatusOr<std::vector<std::string>> tokens = BearerAuth::LoadTokens(path, "x1, x2");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(*tokens, (std::vector<std::string>{"tok-one", "tok-two", "x1", "x2"}));
  EXPECT_TRUE(BearerAuth::LoadTokens("", "")->empty());  // authentication off
  EXPECT_EQ(BearerAuth::LoadTokens(path + ".missing", "").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(BearerAuth::LoadTokens("", " , ").ok());  // set but empty: refused
  {
    std::ofstream out(path);
    out << "# nothing\n";
  }
  EXPECT_FALSE(BearerAuth::LoadTokens(path, "").ok());
  {
    std::ofstream out(path);
    out << "has space\n";
  }
  EXPECT_FALSE(BearerAuth::LoadTokens(path, "").ok());
  std::filesystem::remove(path);
}

class AuthTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ServerOptions options = TestOptions();
    options.auth_tokens = {"s3cret-token", "other"};
    server_ = TestServer::Start(options).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static TestServer* server_;
};
TestServer* AuthTest::server_ = nullptr;

void Authorize(grpc::ClientContext& context, const std::string& token) {
  context.AddMetadata("authorization", "Bearer " + token);
}

TEST_F(AuthTest, EveryInferenceMethodNeedsAValidToken) {
  for (const std::string token : {"", "wrong", "s3cret-tokenX", "s3cret-toke"}) {
    SCOPED_TRACE("token '" + token + "'");
    auto authorize = [&](grpc::ClientContext& context) {
      if (!token.empty()) Authorize(context, token);
    };
    {
      grpc::ClientContext context;
      authorize(context);
      auto reader = server_->stub->Generate(&context, GreedyRequest({1, 2, 3}, 4));
      v1::GenerateResponse response;
      EXPECT_FALSE(reader->Read(&response));
      EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext context;
      authorize(context);
      v1::ModelInfo info;
      EXPECT_EQ(server_->stub->GetModelInfo(&context, {}, &info).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
      EXPECT_EQ(info.architecture(), "");  // nothing leaked
    }
    {
      grpc::ClientContext context;
      authorize(context);
      v1::TokenizeRequest request;
      request.set_text("hello");
      v1::TokenizeResponse response;
      EXPECT_EQ(server_->stub->Tokenize(&context, request, &response).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext context;
      authorize(context);
      v1::DetokenizeRequest request;
      request.add_token_ids(5);
      v1::DetokenizeResponse response;
      EXPECT_EQ(server_->stub->Detokenize(&context, request, &response).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext context;
      authorize(context);
      v1::ExpertStats stats;
      EXPECT_EQ(server_->stub->GetExpertStats(&context, {}, &stats).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
  }
  // A malformed request without a token is UNAUTHENTICATED too: authentication comes first.
  {
    grpc::ClientContext context;
    v1::GenerateRequest request;
    auto reader = server_->stub->Generate(&context, request);
    v1::GenerateResponse response;
    EXPECT_FALSE(reader->Read(&response));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
}

TEST_F(AuthTest, ValidTokensServeAndHealthNeedsNone) {
  OfflineGreedy oracle;
  for (const std::string token : {"s3cret-token", "other"}) {
    grpc::ClientContext context;
    Authorize(context, token);
    auto reader = server_->stub->Generate(&context, GreedyRequest({4, 5, 6}, 6));
    std::vector<int32_t> tokens;
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
      tokens.insert(tokens.end(), response.token_ids().begin(), response.token_ids().end());
    }
    EXPECT_TRUE(reader->Finish().ok());
    EXPECT_EQ(tokens, oracle.Generate({4, 5, 6}, 6));
  }
  EXPECT_EQ(server_->Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(server_->Health(kServiceName), grpc::health::v1::HealthCheckResponse::SERVING);
}

// ---- Fuzzer regressions -------------------------------------------------------------------
// (Inputs that crashed or failed a check in fuzz/; none so far beyond what the cases above
// cover. Add each new reproducer here with the bytes and the expected status.)

}  // namespace
}  // namespace moe::server::testing
