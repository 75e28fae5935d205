// Command-line programs: --help lists the flags defined in the program's own source file
// (absl's default only matches files named like the binary, which ours are not).
#pragma once

#include <string>

#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"

namespace moe {

// `source_file`: the path suffix of the file defining the flags, e.g. "client/moe_client.cc".
inline void SetProgramUsage(absl::string_view source_file, absl::string_view message) {
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [file = std::string(source_file)](absl::string_view path) {
    return absl::EndsWith(path, file);
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(message);
}

}  // namespace moe
