fn main() -> std::process::ExitCode {
    tooln1::cli::main()
}
