//! `hearth-testvmm`: a test stand-in for Firecracker (see the library docs).

fn main() -> std::process::ExitCode {
    hearth_testvmm::cli::run()
}
