// Command-line programs: --help lists the flags defined in the program's own source file
// (absl's default only matches files named like the binary, which ours are not).
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"

namespace moe {

// `source_files`: path suffixes of the files defining the program's flags, e.g.
// {"client/moe_client.cc", "client/connection.cc"}.
inline void SetProgramUsage(std::initializer_list<absl::string_view> source_files,
                            absl::string_view message) {
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags =
      [files = std::vector<std::string>(source_files.begin(), source_files.end())](
          absl::string_view path) {
        for (const std::string& file : files) {
          if (absl::EndsWith(path, file)) return true;
        }
        return false;
      };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(message);
}

inline void SetProgramUsage(absl::string_view source_file, absl::string_view message) {
  SetProgramUsage({source_file}, message);
}

}  // namespace moe
