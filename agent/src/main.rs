fn main() -> std::process::ExitCode {
    phigate::cli::main()
}
