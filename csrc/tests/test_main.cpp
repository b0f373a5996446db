// Entry point of exml_fast_cpp_tests; the cases register themselves from the
// other files in this directory.
#include "harness.h"

int main(int argc, char** argv) { return exml_test::main(argc, argv); }
