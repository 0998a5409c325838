/// Large freed blocks are kept for reuse (see `ReuseAlloc`): the CPU backend's activations
/// then stop coming back from the kernel as fresh zeroed pages every step.
#[global_allocator]
static ALLOC: tooln1::backend::cpu::ReuseAlloc = tooln1::backend::cpu::ReuseAlloc;

fn main() -> std::process::ExitCode {
    tooln1::cli::main()
}
