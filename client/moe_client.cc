// moe-client: command-line client of moe-serve.
//
//   moe-client generate "Once upon a time" [--max_tokens=64 --temperature=0 --n=1 --json ...]
//   moe-client generate --chat [--system="You are terse."] "What is an expert?"
//   moe-client tokenize "some text"
//   moe-client info
//   moe-client stats [--since_start]
//   moe-client health
//
// --target (default localhost:50051, env MOE_TARGET) selects the server; --tls_ca (TLS),
// --tls_cert/--tls_key (mutual TLS) and --auth_token (env MOE_AUTH_TOKEN) reach a secured one.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/connection.h"
#include "engine/common/program_usage.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "moe/serving/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, target, "", "Server address (default localhost:50051; env MOE_TARGET)");
ABSL_FLAG(bool, json, false, "Machine output: one JSON object per line");
ABSL_FLAG(double, timeout, 0, "Deadline in seconds (0 = none)");
// generate
ABSL_FLAG(std::string, token_ids, "", "generate: prompt as comma-separated token ids");
ABSL_FLAG(int32_t, max_tokens, 64, "generate: tokens to generate at most");
ABSL_FLAG(int32_t, min_tokens, 0, "generate: tokens before EOS is allowed");
ABSL_FLAG(double, temperature, 0.0, "generate: temperature (0 = greedy)");
ABSL_FLAG(double, top_p, 1.0, "generate: nucleus sampling mass");
ABSL_FLAG(int32_t, top_k, 0, "generate: keep the k most likely tokens (0 = all)");
ABSL_FLAG(double, min_p, 0.0, "generate: min-p");
ABSL_FLAG(double, repetition_penalty, 1.0, "generate: repetition penalty (1 = off)");
ABSL_FLAG(int64_t, seed, -1, "generate: random seed (-1 = server's choice)");
ABSL_FLAG(std::vector<std::string>, stop, {}, "generate: stop strings, comma-separated");
ABSL_FLAG(bool, ignore_eos, false, "generate: keep going past EOS");
ABSL_FLAG(int32_t, logprobs, 0, "generate: top log-probabilities per token (0..20)");
ABSL_FLAG(std::vector<std::string>, logit_bias, {},
          "generate: ID:BIAS,... added to those tokens' logits (bias in [-100, 100])");
ABSL_FLAG(bool, routing, false, "generate: return per-token expert routing (with --json)");
ABSL_FLAG(bool, prompt_logprobs, false,
          "generate: log-probability of each prompt token (--json: per token; text: the sum)");
ABSL_FLAG(std::string, request_id, "", "generate: request id");
ABSL_FLAG(bool, parse_tool_calls, false,
          "generate: tool calls (<tool_call> blocks) apart from the text (--json: \"tool_calls\"; "
          "text: a line [tool_call] NAME ARGUMENTS each)");
ABSL_FLAG(bool, separate_reasoning, false,
          "generate: the <think> block apart from the answer (--json: \"reasoning_text\"; "
          "text: the reasoning first, between lines [reasoning] and [answer])");
ABSL_FLAG(int32_t, n, 1,
          "generate: completions of the prompt (1..16); with n > 1 each one's text is printed "
          "when it finishes, prefixed by [index] (--json: lines carry \"index\")");
// chat (generate and tokenize)
ABSL_FLAG(bool, chat, false,
          "generate/tokenize: PROMPT is a user message, rendered by the model's chat template");
ABSL_FLAG(std::string, system, "", "--chat: a system message before it");
ABSL_FLAG(std::string, messages_file, "",
          "chat: the conversation from a JSON file, [{\"role\": ..., \"content\": ...}, ...] "
          "(PROMPT, if given, is added as the last user message)");
ABSL_FLAG(std::string, template_vars, "",
          "chat: further template variables as a JSON object, e.g. '{\"enable_thinking\": false}'");
ABSL_FLAG(bool, no_generation_prompt, false, "chat: do not open the assistant's turn at the end");
ABSL_FLAG(bool, continue_final_message, false,
          "chat: the model continues the last message (e.g. an assistant answer begun in "
          "--messages_file) instead of starting a new turn");
// tokenize
ABSL_FLAG(bool, pieces, false, "tokenize: print the token strings too");
ABSL_FLAG(bool, no_special, false, "tokenize/generate: do not add special tokens (BOS)");
// stats
ABSL_FLAG(bool, since_start, false, "stats: show the load since start instead of the window");

namespace {

namespace v1 = ::moe::serving::v1;

std::string Target() {
  std::string target = absl::GetFlag(FLAGS_target);
  if (target.empty()) {
    const char* env = std::getenv("MOE_TARGET");
    target = env != nullptr ? env : "localhost:50051";
  }
  return target;
}

// Deadline (--timeout) and bearer token (--auth_token) of every call.
void SetDeadline(grpc::ClientContext& context) {
  moe::client::AddAuthToken(context);
  const double timeout = absl::GetFlag(FLAGS_timeout);
  if (timeout > 0) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::microseconds(static_cast<int64_t>(timeout * 1e6)));
  }
}

int Fail(const grpc::Status& status) {
  std::fprintf(stderr, "moe-client: %s (code %d): %s\n",
               status.error_code() == grpc::StatusCode::UNAVAILABLE ? "UNAVAILABLE" : "error",
               static_cast<int>(status.error_code()), status.error_message().c_str());
  return 1;
}

const char* FinishName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_STOP_STRING:
      return "stop_string";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    default:
      return "unspecified";
  }
}

// The summary of a finished completion (stderr): finish reason, usage, timing.
void PrintSummary(const v1::GenerateResponse& last, const std::string& prefix) {
  const v1::Usage& u = last.usage();
  std::fprintf(stderr,
               "%s[finish=%s prompt_tokens=%d completion_tokens=%d cached=%d ttft=%.1fms "
               "total=%.1fms]\n",
               prefix.c_str(), FinishName(last.finish_reason()), u.prompt_tokens(),
               u.completion_tokens(), u.cached_prompt_tokens(),
               last.timing().time_to_first_token_seconds() * 1e3,
               last.timing().total_seconds() * 1e3);
}

bool ChatRequested() {
  return absl::GetFlag(FLAGS_chat) || !absl::GetFlag(FLAGS_messages_file).empty();
}

// The chat prompt of the --chat / --messages_file / --system / --template_vars flags, or an
// error message.
absl::StatusOr<v1::ChatPrompt> ChatFromFlags(const std::string& prompt) {
  v1::ChatPrompt chat;
  const std::string path = absl::GetFlag(FLAGS_messages_file);
  if (!path.empty()) {
    std::ifstream in(path);
    const nlohmann::json messages = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (!messages.is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--messages_file=", path, ": not a JSON array of {\"role\", \"content\"} objects"));
    }
    for (const nlohmann::json& message : messages) {
      const bool well_formed = message.is_object() && message.contains("role") &&
                               message.contains("content") && message["role"].is_string() &&
                               message["content"].is_string();
      if (!well_formed) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--messages_file=", path, ": each message needs string \"role\" and \"content\""));
      }
      v1::ChatMessage* added = chat.add_messages();
      added->set_role(message["role"].get<std::string>());
      added->set_content(message["content"].get<std::string>());
    }
  } else if (!absl::GetFlag(FLAGS_system).empty()) {
    v1::ChatMessage* system = chat.add_messages();
    system->set_role("system");
    system->set_content(absl::GetFlag(FLAGS_system));
  }
  if (!prompt.empty()) {
    v1::ChatMessage* user = chat.add_messages();
    user->set_role("user");
    user->set_content(prompt);
  }
  if (absl::GetFlag(FLAGS_no_generation_prompt)) chat.set_add_generation_prompt(false);
  chat.set_continue_final_message(absl::GetFlag(FLAGS_continue_final_message));
  const std::string vars = absl::GetFlag(FLAGS_template_vars);
  if (!vars.empty()) {
    const nlohmann::json object = nlohmann::json::parse(vars, nullptr, /*allow_exceptions=*/false);
    if (!object.is_object()) {
      return absl::InvalidArgumentError("--template_vars: not a JSON object");
    }
    for (const auto& [name, value] : object.items()) {
      (*chat.mutable_template_variables())[name] = value.dump();
    }
  }
  return chat;
}

int Generate(v1::Inference::Stub& stub, const std::string& prompt) {
  v1::GenerateRequest request;
  const std::string ids = absl::GetFlag(FLAGS_token_ids);
  if (ChatRequested()) {
    absl::StatusOr<v1::ChatPrompt> chat = ChatFromFlags(prompt);
    if (!chat.ok()) {
      std::fprintf(stderr, "moe-client: %s\n", std::string(chat.status().message()).c_str());
      return 2;
    }
    *request.mutable_chat() = *std::move(chat);
  } else if (!ids.empty()) {
    for (absl::string_view part : absl::StrSplit(ids, ',', absl::SkipWhitespace())) {
      int32_t id = 0;
      if (!absl::SimpleAtoi(part, &id)) {
        std::fprintf(stderr, "moe-client: --token_ids: '%s' is not an integer\n",
                     std::string(part).c_str());
        return 2;
      }
      request.mutable_token_ids()->add_ids(id);
    }
  } else {
    request.set_text(prompt);
  }
  if (absl::GetFlag(FLAGS_no_special)) request.set_add_special_tokens(false);
  request.set_request_id(absl::GetFlag(FLAGS_request_id));
  v1::SamplingParams* sampling = request.mutable_sampling();
  sampling->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  sampling->set_top_p(static_cast<float>(absl::GetFlag(FLAGS_top_p)));
  sampling->set_top_k(absl::GetFlag(FLAGS_top_k));
  sampling->set_min_p(static_cast<float>(absl::GetFlag(FLAGS_min_p)));
  sampling->set_repetition_penalty(static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty)));
  if (absl::GetFlag(FLAGS_seed) >= 0) sampling->set_seed(absl::GetFlag(FLAGS_seed));
  for (const std::string& entry : absl::GetFlag(FLAGS_logit_bias)) {
    const std::pair<std::string, std::string> parts = absl::StrSplit(entry, ':');
    int32_t id = 0;
    float bias = 0;
    if (!absl::SimpleAtoi(parts.first, &id) || !absl::SimpleAtof(parts.second, &bias)) {
      std::fprintf(stderr, "moe-client: --logit_bias: '%s' is not ID:BIAS\n", entry.c_str());
      return 2;
    }
    (*sampling->mutable_logit_bias())[id] = bias;
  }
  v1::StopParams* stop = request.mutable_stop();
  stop->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  stop->set_min_tokens(absl::GetFlag(FLAGS_min_tokens));
  stop->set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  for (const std::string& s : absl::GetFlag(FLAGS_stop)) stop->add_stop_strings(s);
  request.set_logprobs(absl::GetFlag(FLAGS_logprobs));
  request.set_return_routing(absl::GetFlag(FLAGS_routing));
  request.set_prompt_logprobs(absl::GetFlag(FLAGS_prompt_logprobs));
  request.set_separate_reasoning(absl::GetFlag(FLAGS_separate_reasoning));
  request.set_parse_tool_calls(absl::GetFlag(FLAGS_parse_tool_calls));
  double prompt_logprob_sum = 0;
  int32_t prompt_logprob_count = 0;
  const int32_t n = absl::GetFlag(FLAGS_n);
  if (n != 1) request.set_n(n);

  const bool json = absl::GetFlag(FLAGS_json);
  // n > 1 (text output): each completion's text until its last response, then printed whole.
  std::map<int32_t, std::string> texts, reasonings;
  enum class Section { kNone, kReasoning, kAnswer };
  Section section = Section::kNone;
  grpc::ClientContext context;
  SetDeadline(context);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  v1::GenerateResponse response;
  v1::GenerateResponse last;
  while (reader->Read(&response)) {
    for (const auto& p : response.prompt_logprobs()) {
      prompt_logprob_sum += p.logprob();
      ++prompt_logprob_count;
    }
    if (json) {
      nlohmann::json line = {{"request_id", response.request_id()},
                             {"token_ids", std::vector<int32_t>(response.token_ids().begin(),
                                                                response.token_ids().end())},
                             {"text", response.text()}};
      if (n > 1) line["index"] = response.index();
      if (request.separate_reasoning()) line["reasoning_text"] = response.reasoning_text();
      if (response.tool_calls_size() > 0) {
        nlohmann::json calls = nlohmann::json::array();
        for (const v1::ToolCall& call : response.tool_calls()) {
          calls.push_back(
              {{"index", call.index()}, {"name", call.name()}, {"arguments", call.arguments()}});
        }
        line["tool_calls"] = calls;
      }
      if (response.logprobs_size() > 0) {
        nlohmann::json lps = nlohmann::json::array();
        for (const auto& lp : response.logprobs()) {
          nlohmann::json top = nlohmann::json::array();
          for (const auto& t : lp.top()) top.push_back({t.token_id(), t.logprob()});
          lps.push_back({{"token_id", lp.chosen().token_id()},
                         {"logprob", lp.chosen().logprob()},
                         {"top", top}});
        }
        line["logprobs"] = lps;
      }
      if (response.routing_size() > 0) {
        nlohmann::json routing = nlohmann::json::array();
        for (const auto& r : response.routing()) {
          nlohmann::json layers = nlohmann::json::array();
          for (const auto& l : r.layers()) {
            layers.push_back(
                {{"layer", l.layer()},
                 {"experts", std::vector<int32_t>(l.expert_ids().begin(), l.expert_ids().end())},
                 {"weights", std::vector<float>(l.weights().begin(), l.weights().end())}});
          }
          routing.push_back({{"position", r.position()}, {"layers", layers}});
        }
        line["routing"] = routing;
      }
      if (response.prompt_logprobs_size() > 0) {
        nlohmann::json scored = nlohmann::json::array();
        for (const auto& p : response.prompt_logprobs()) {
          scored.push_back(
              {{"position", p.position()}, {"token_id", p.token_id()}, {"logprob", p.logprob()}});
        }
        line["prompt_logprobs"] = scored;
      }
      if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        line["finish_reason"] = FinishName(response.finish_reason());
        if (!response.matched_stop_string().empty()) {
          line["matched_stop_string"] = response.matched_stop_string();
        }
        const v1::Usage& u = response.usage();
        line["usage"] = {{"prompt_tokens", u.prompt_tokens()},
                         {"completion_tokens", u.completion_tokens()},
                         {"cached_prompt_tokens", u.cached_prompt_tokens()},
                         {"active_parameters_per_token", u.active_parameters_per_token()},
                         {"active_parameters_used", u.active_parameters_used()}};
        line["timing"] = {{"ttft_s", response.timing().time_to_first_token_seconds()},
                          {"total_s", response.timing().total_seconds()}};
      }
      std::printf("%s\n",
                  line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else if (n > 1) {
      const int32_t index = response.index();
      texts[index] += response.text();
      reasonings[index] += response.reasoning_text();
      if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        if (request.separate_reasoning()) {
          std::printf("[%d] [reasoning]\n%s\n[%d] [answer]\n", index, reasonings[index].c_str(),
                      index);
        }
        std::printf("[%d] %s\n", index, texts[index].c_str());
        std::fflush(stdout);
        PrintSummary(response, absl::StrCat("[", index, "] "));
      }
    } else {
      // With --separate_reasoning each section starts with its own header line.
      for (const auto& [part, name] :
           {std::pair<const std::string*, Section>(&response.reasoning_text(), Section::kReasoning),
            {&response.text(), Section::kAnswer}}) {
        if (part->empty()) continue;
        if (request.separate_reasoning() && section != name) {
          std::printf("%s[%s]\n", section == Section::kNone ? "" : "\n",
                      name == Section::kReasoning ? "reasoning" : "answer");
          section = name;
        }
        std::fwrite(part->data(), 1, part->size(), stdout);
      }
      for (const v1::ToolCall& call : response.tool_calls()) {
        std::printf("\n[tool_call] %s %s\n", call.name().c_str(), call.arguments().c_str());
      }
    }
    std::fflush(stdout);
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = response;
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) {
    if (!json && n <= 1) std::printf("\n");
    return Fail(status);
  }
  if (!json && n <= 1) {
    std::printf("\n");
    PrintSummary(last, "");
    if (prompt_logprob_count > 0) {
      std::fprintf(stderr, "[prompt logprob sum=%.4f over %d tokens, perplexity=%.3f]\n",
                   prompt_logprob_sum, prompt_logprob_count,
                   std::exp(-prompt_logprob_sum / prompt_logprob_count));
    }
  }
  return 0;
}

int Tokenize(v1::Inference::Stub& stub, const std::string& text) {
  v1::TokenizeRequest request;
  if (ChatRequested()) {
    absl::StatusOr<v1::ChatPrompt> chat = ChatFromFlags(text);
    if (!chat.ok()) {
      std::fprintf(stderr, "moe-client: %s\n", std::string(chat.status().message()).c_str());
      return 2;
    }
    *request.mutable_chat() = *std::move(chat);
  } else {
    request.set_text(text);
  }
  request.set_return_pieces(absl::GetFlag(FLAGS_pieces) || absl::GetFlag(FLAGS_json));
  if (absl::GetFlag(FLAGS_no_special)) request.set_add_special_tokens(false);
  v1::TokenizeResponse response;
  grpc::ClientContext context;
  SetDeadline(context);
  const grpc::Status status = stub.Tokenize(&context, request, &response);
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json out = {
        {"token_ids",
         std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end())},
        {"pieces", std::vector<std::string>(response.pieces().begin(), response.pieces().end())}};
    if (request.has_chat()) out["chat_text"] = response.chat_text();
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  for (int i = 0; i < response.token_ids_size(); ++i) {
    if (absl::GetFlag(FLAGS_pieces)) {
      std::printf("%d\t%s\n", response.token_ids(i), response.pieces(i).c_str());
    } else {
      std::printf(i + 1 < response.token_ids_size() ? "%d " : "%d\n", response.token_ids(i));
    }
  }
  return 0;
}

int Info(v1::Inference::Stub& stub) {
  v1::ModelInfo info;
  grpc::ClientContext context;
  SetDeadline(context);
  const grpc::Status status = stub.GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::string text;
    google::protobuf::util::JsonPrintOptions options;
    options.always_print_primitive_fields = true;
    (void)google::protobuf::util::MessageToJsonString(info, &text, options);
    std::printf("%s\n", text.c_str());
    return 0;
  }
  const auto& p = info.parameters();
  std::printf(
      "model         %s\narchitecture  %s (%s)\nlayers        %d (%d MoE: %s)\n"
      "experts       %d routed, top-%d, %d shared\nparameters    %.2fM total, %.2fM active per "
      "token (%.1f%%)\ndtype         %s\nbackend       %s\ncontext       %d tokens (prompt at "
      "most %d)\nKV cache      %d blocks x %d tokens = %lld tokens (%s)\nvocab         %d "
      "(tokenizer: %s, chat template: %s)\nserver        %s\n",
      info.model_path().c_str(), info.architecture().c_str(), info.architecture_class().c_str(),
      info.num_layers(), info.num_moe_layers(),
      absl::StrJoin(info.moe_layer_indices(), ",").c_str(), info.num_experts(), info.top_k(),
      info.num_shared_experts(), p.total() / 1e6, p.active_per_token() / 1e6,
      p.total() > 0 ? 100.0 * p.active_per_token() / p.total() : 0.0, info.dtype().c_str(),
      info.device().c_str(), info.context_length(), info.max_prompt_tokens(),
      info.kv_total_blocks(), info.kv_block_size(),
      static_cast<long long>(info.kv_capacity_tokens()), info.kv_cache_dtype().c_str(),
      info.vocab_size(), info.has_tokenizer() ? "yes" : "no",
      info.has_chat_template() ? "yes" : "no", info.server_version().c_str());
  return 0;
}

int Stats(v1::Inference::Stub& stub) {
  v1::ExpertStats stats;
  grpc::ClientContext context;
  SetDeadline(context);
  const grpc::Status status = stub.GetExpertStats(&context, v1::GetExpertStatsRequest(), &stats);
  if (!status.ok()) return Fail(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::string text;
    google::protobuf::util::JsonPrintOptions options;
    options.always_print_primitive_fields = true;
    (void)google::protobuf::util::MessageToJsonString(stats, &text, options);
    std::printf("%s\n", text.c_str());
    return 0;
  }
  const bool since_start = absl::GetFlag(FLAGS_since_start);
  const v1::LoadSpan& span = since_start ? stats.since_start() : stats.window();
  std::printf("expert load, %s: %lld steps, %lld tokens, %d experts, top-%d\n",
              since_start ? "since start" : "recent window", static_cast<long long>(span.steps()),
              static_cast<long long>(span.tokens()), stats.num_experts(), stats.top_k());
  // Heatmap: one row per MoE layer, one cell per expert, shade = c_i / max_i c_i of the row.
  static const char* kShades[] = {" ", "░", "▒", "▓", "█"};
  std::printf("layer  %-*s  max/mean   cv    entropy  switch  z      dead\n", stats.num_experts(),
              "experts");
  for (const v1::LayerLoad& layer : span.layers()) {
    int64_t max = 0;
    for (int64_t c : layer.expert_counts()) max = std::max(max, c);
    std::string row;
    for (int64_t c : layer.expert_counts()) {
      const int shade =
          max == 0 ? 0 : (c == 0 ? 0 : 1 + static_cast<int>(3.999 * c / static_cast<double>(max)));
      row += kShades[std::min(shade, 4)];
    }
    std::printf("%5d  %s  %8.2f  %5.2f  %7.3f  %6.3f  %-6.2f %d\n", layer.layer(), row.c_str(),
                layer.max_load_ratio(), layer.load_cv(), layer.entropy_ratio(),
                layer.switch_balance(), layer.router_z(), layer.dead_experts());
  }
  std::printf("shade: ' ' none, ░ ▒ ▓ █ up to the layer's hottest expert\n");
  return 0;
}

int Health(const std::shared_ptr<grpc::Channel>& channel, const std::string& service) {
  grpc::health::v1::Health::Stub stub(channel);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::ClientContext context;
  SetDeadline(context);
  const grpc::Status status = stub.Check(&context, request, &response);
  if (!status.ok()) return Fail(status);
  const std::string name =
      grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", nlohmann::json({{"status", name}}).dump().c_str());
  } else {
    std::printf("%s\n", name.c_str());
  }
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  moe::SetProgramUsage(
      {"client/moe_client.cc", "client/connection.cc"},
      "moe-client COMMAND [ARGS] [flags]\n"
      "  generate PROMPT   stream generated text to stdout (--json: one JSON object per "
      "response; --token_ids=1,2,3 instead of PROMPT; --n=N: N completions; --chat: PROMPT is "
      "a user message for the model's chat template)\n"
      "  tokenize TEXT     print token ids (--pieces: with their strings; --chat: of the chat "
      "prompt, --json adds its text)\n"
      "  info              the model: architecture, parameters, backend, limits\n"
      "  stats             expert-load heatmap, layers x experts, and imbalance figures\n"
      "  health [SERVICE]  grpc.health.v1 status; exit 0 when SERVING\n"
      "Server: --target=HOST:PORT (env MOE_TARGET, default localhost:50051); TLS: --tls_ca "
      "(+ --tls_cert, --tls_key for mutual TLS); authentication: --auth_token (env "
      "MOE_AUTH_TOKEN).");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::fprintf(stderr, "moe-client: a command is required; see --help\n");
    return 2;
  }
  const std::string command = args[1];
  const std::string arg = args.size() > 2 ? args[2] : "";
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(64 << 20);
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      moe::client::ChannelCredentials("moe-client");
  if (credentials == nullptr) return 2;
  auto channel = grpc::CreateCustomChannel(Target(), credentials, channel_args);
  v1::Inference::Stub stub(channel);
  if (command == "generate") {
    if (arg.empty() && absl::GetFlag(FLAGS_token_ids).empty() &&
        absl::GetFlag(FLAGS_messages_file).empty()) {
      std::fprintf(stderr, "moe-client generate: give a PROMPT, --token_ids or --messages_file\n");
      return 2;
    }
    return Generate(stub, arg);
  }
  if (command == "tokenize") return Tokenize(stub, arg);
  if (command == "info") return Info(stub);
  if (command == "stats") return Stats(stub);
  if (command == "health") return Health(channel, arg);
  std::fprintf(stderr, "moe-client: unknown command '%s'; see --help\n", command.c_str());
  return 2;
}
