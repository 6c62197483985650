// The baseline for `make size`: a program that does nothing. Every other
// tests/size_<name>.cpp is measured against it.
int main() { return 0; }
