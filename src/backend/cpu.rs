//! The f32 CPU reference backend: plain loops that read like the math.

/// The CPU backend (f32 everywhere).
#[derive(Clone, Debug, Default)]
pub struct Cpu;
