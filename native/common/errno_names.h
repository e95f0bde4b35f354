// errno number -> symbolic name ("EINVAL"), shared by the addon and the runner.
#pragma once

namespace microvm {

// Returns the symbolic name of a positive errno value, or "EUNKNOWN" when it has none here.
const char* ErrnoName(int err);

}  // namespace microvm
