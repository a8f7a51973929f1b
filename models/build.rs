//! Links libtorch with an rpath (and CUDA where present); see `build/link_libtorch.rs`.
include!("../build/link_libtorch.rs");

fn main() {
    link_libtorch();
}
