"""The C++ runner for exported libraries, and the script that fetches the aarch64 TVM runtime."""
