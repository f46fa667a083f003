// tilegen common layer, host side: error reports. An op library's C functions return 0, or 1 with a
// message written into the caller's buffer (the binding raises it as a Python exception), so every
// failure names its op and what failed. Shared by every op kind's host code.
#pragma once
#include <cstdarg>
#include <cstdio>

namespace tilegen {
int fail(char* msg, int len, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
inline int fail(char* msg, int len, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, len, fmt, ap);
  va_end(ap);
  return 1;
}
}  // namespace tilegen
