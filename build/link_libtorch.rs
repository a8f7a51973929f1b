// Shared by the build scripts of every crate whose binaries (bins, tests, benches) link libtorch.
// It is `include!`d, not a crate, so it stays one file. It makes those binaries run without
// LD_LIBRARY_PATH and use CUDA where the wheel ships it:
// - an rpath to the libtorch `lib/` that torch-sys built against (it publishes the directory as
//   `DEP_TCH_LIBTORCH_LIB` to crates that depend on `torch-sys` directly);
// - `--no-as-needed` before `torch_cuda`, so the linker keeps the CUDA library even though no
//   symbol of ours names it (it registers the CUDA backend from its static initialisers).

/// Emits the link arguments; call it from `main` of a build script.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not publish its libtorch lib dir; no rpath set");
        return;
    };
    let lib = std::path::Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for name in ["torch_cuda", "torch_cpu", "torch"] {
        if lib.join(format!("lib{name}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{name}");
        }
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
