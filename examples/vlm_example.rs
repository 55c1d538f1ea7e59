// Ask SmolVLM2 about an image from Rust through libvlm (no crates needed).
//   vlm lib build --out lib
//   rustc examples/vlm_example.rs -L lib -o vlm_example_rs
//   ./vlm_example_rs MODEL IMAGE "What is in this image?"
use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr;

#[repr(C)]
struct VlmOptions { abi_version: u32, n_threads: i32, n_gpu_layers: i32, n_ctx: i32, seed: u32,
                    max_tokens: i32, temperature: f32, top_p: f32, detail: i32, max_tiles: i32,
                    best_of: i32, select: i32 }
#[repr(C)]
struct VlmImage { path: *const c_char, rgb: *const u8, width: i32, height: i32 }

#[link(name = "vlm")]
extern "C" {
    fn vlm_open(model: *const c_char, opts: *const VlmOptions) -> i64;
    fn vlm_ask(h: i64, image: *const VlmImage, prompt: *const c_char,
               out: *mut c_char, out_size: usize, needed: *mut usize) -> c_int;
    fn vlm_last_error(h: i64) -> *const c_char;
    fn vlm_close(h: i64) -> c_int;
}

const VLM_ABI_VERSION: u32 = 2;
const VLM_E_BUFFER_TOO_SMALL: c_int = -3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (model, image, prompt) = (CString::new(args[1].as_str()).unwrap(),
        CString::new(args[2].as_str()).unwrap(), CString::new(args[3].as_str()).unwrap());
    let opts = VlmOptions { abi_version: VLM_ABI_VERSION, n_threads: 0, n_gpu_layers: 0, n_ctx: 0, seed: 0,
                            max_tokens: 32, temperature: 0.0, top_p: 0.0, detail: 0, max_tiles: 0,
                            best_of: 0, select: 0 };
    unsafe {
        let h = vlm_open(model.as_ptr(), &opts);
        if h < 0 {
            eprintln!("vlm_open: {}", CStr::from_ptr(vlm_last_error(0)).to_string_lossy());
            std::process::exit(1);
        }
        let img = VlmImage { path: image.as_ptr(), rgb: ptr::null(), width: 0, height: 0 };
        let mut needed = 0usize;
        let mut out = vec![0u8; 256];
        let mut st = vlm_ask(h, &img, prompt.as_ptr(), out.as_mut_ptr() as *mut c_char, out.len(), &mut needed);
        if st == VLM_E_BUFFER_TOO_SMALL {
            out = vec![0u8; needed];
            st = vlm_ask(h, &img, prompt.as_ptr(), out.as_mut_ptr() as *mut c_char, out.len(), &mut needed);
        }
        if st != 0 {
            eprintln!("vlm_ask: {}", CStr::from_ptr(vlm_last_error(h)).to_string_lossy());
        } else {
            println!("{}", CStr::from_ptr(out.as_ptr() as *const c_char).to_string_lossy());
        }
        vlm_close(h);
    }
}
