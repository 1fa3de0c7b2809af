fn main() -> std::process::ExitCode {
    webio_router::cli::main()
}
