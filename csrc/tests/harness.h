// A minimal test harness for the C++ tests run by ctest: no dependency beyond
// the standard library. Each case is registered with EXML_TEST(name); the
// executable runs the case named by argv[1] so that ctest reports cases one by one.
//
//   exml_fast_cpp_tests NAME            run one case: exit 0 pass, 1 fail, 77 skip
//   exml_fast_cpp_tests                 run every case, print a summary
//   exml_fast_cpp_tests --list          print the case names, one a line
//   exml_fast_cpp_tests --check-list N...  fail unless N... are exactly the cases
//                                       (keeps the ctest list in CMakeLists.txt honest)
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace exml_test {

// ctest's SKIP_RETURN_CODE for these tests (see CMakeLists.txt).
inline constexpr int kSkipReturnCode = 77;

struct Failure : std::exception {
  std::string msg;
  explicit Failure(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

struct Skipped {
  std::string why;
};

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(const char* file, int line, const Args&... args) {
  throw Failure(::exml_test::str(file, ":", line, ": ", args...));
}

// Runs f and fails unless it throws E whose what() contains `needle`.
template <typename E, typename F>
void expect_throws(F&& f, const char* needle, const char* expr, const char* file, int line) {
  try {
    f();
  } catch (const E& e) {
    const std::string what = e.what();
    if (what.find(needle) == std::string::npos) {
      fail(file, line, expr, " threw, but the message lacks \"", needle, "\":\n", what);
    }
    return;
  } catch (const std::exception& e) {
    fail(file, line, expr, " threw an exception of another type: ", e.what());
  }
  fail(file, line, expr, " did not throw");
}

inline int run_case(const Case& c) {
  try {
    c.fn();
  } catch (const Skipped& s) {
    std::printf("SKIP %s: %s\n", c.name, s.why.c_str());
    return kSkipReturnCode;
  } catch (const Failure& f) {
    std::printf("FAIL %s\n  %s\n", c.name, f.what());
    return 1;
  } catch (const std::exception& e) {
    std::printf("FAIL %s: unexpected exception\n  %s\n", c.name, e.what());
    return 1;
  }
  std::printf("PASS %s\n", c.name);
  return 0;
}

inline int main(int argc, char** argv) {
  auto& cases = registry();
  std::sort(cases.begin(), cases.end(),
            [](const Case& a, const Case& b) { return std::strcmp(a.name, b.name) < 0; });
  if (argc >= 2 && std::strcmp(argv[1], "--list") == 0) {
    for (const Case& c : cases) std::printf("%s\n", c.name);
    return 0;
  }
  if (argc >= 2 && std::strcmp(argv[1], "--check-list") == 0) {
    std::set<std::string> want(argv + 2, argv + argc), have;
    for (const Case& c : cases) have.insert(c.name);
    int bad = 0;
    for (const auto& n : have) {
      if (!want.count(n)) std::printf("case %s is not registered with ctest\n", n.c_str()), ++bad;
    }
    for (const auto& n : want) {
      if (!have.count(n)) std::printf("ctest names %s, which is no case\n", n.c_str()), ++bad;
    }
    std::printf("%zu cases, %d mismatches\n", have.size(), bad);
    return bad == 0 ? 0 : 1;
  }
  if (argc >= 2) {
    for (const Case& c : cases) {
      if (std::strcmp(c.name, argv[1]) == 0) return run_case(c);
    }
    std::printf("no test case named %s (see --list)\n", argv[1]);
    return 2;
  }
  int failed = 0, skipped = 0;
  for (const Case& c : cases) {
    const int rc = run_case(c);
    failed += rc == 1;
    skipped += rc == kSkipReturnCode;
  }
  std::printf("%zu cases: %zu passed, %d failed, %d skipped\n", cases.size(),
              cases.size() - failed - skipped, failed, skipped);
  return failed == 0 ? 0 : 1;
}

}  // namespace exml_test

#define EXML_TEST(name)                                                                \
  static void exml_test_##name();                                                      \
  static const ::exml_test::Register exml_test_register_##name(#name, &exml_test_##name); \
  static void exml_test_##name()

// EXML_CHECK(cond, message parts...): fails the case when cond is false.
#define EXML_CHECK(cond, ...)                                                        \
  do {                                                                               \
    if (!(cond)) ::exml_test::fail(__FILE__, __LINE__, "check failed: " #cond " " __VA_OPT__(,) __VA_ARGS__); \
  } while (0)

// EXML_EXPECT_THROWS(ExceptionType, statement, "substring of the message")
#define EXML_EXPECT_THROWS(E, stmt, needle) \
  ::exml_test::expect_throws<E>([&] { (void)(stmt); }, needle, #stmt, __FILE__, __LINE__)

#define EXML_SKIP(...) throw ::exml_test::Skipped{::exml_test::str(__VA_ARGS__)}
