//! The CUDA backend (feature `cuda`): device memory and one stream per GPU through
//! cudarc (loaded at run time, so builds need no CUDA), GEMMs through cuBLASLt (bf16 or
//! f16 weights with bf16/f16 activations and f32 accumulation and output; f32 with f32),
//! and every other operation a kernel of `kernels.cu`, compiled by NVRTC for the
//! device's architecture when the device is first opened.
//!
//! Activations are f32 on the device as on the host; weights keep their dtype (16-bit
//! ones as raw bit patterns). Without a driver, NVRTC or cuBLASLt at run time opening a
//! device is an error naming what is missing, never a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::{result as lt, sys as lts};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};

use crate::attention::AttnShape;
use crate::storage::{BackendStorage, Binary, CpuStorage, Unary};
use crate::{Activation, DType, Device, Error, Result};

/// The kernels' source, compiled at start-up.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every kernel the backend launches (each must be in `SOURCE`).
pub const KERNELS: &[&str] = &[
    "to_f32",
    "f32_to_half",
    "round_in_place",
    "unary",
    "binary",
    "binary_row",
    "layer_norm",
    "rms_norm",
    "softmax_rows",
    "l2_normalize_rows",
    "first_non_finite",
    "argmax_rows",
    "gather_rows",
    "narrow_cols",
    "put_cols",
    "scatter_rows",
    "patches",
    "rope",
    "attention",
    "paged_attention",
    "kv_write",
    "sample_rows",
];

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Whether NVRTC can be loaded (from the library path).
pub fn nvrtc_present() -> bool {
    // SAFETY: probes for the library by name; loads nothing else.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles [`SOURCE`] to PTX for `arch` (`"sm_80"`, `"sm_90"`, …) with the options
/// the backend uses; errors carry NVRTC's log.
pub fn compile(arch: &'static str) -> Result<String> {
    compile_source(SOURCE, arch)
}

/// [`compile`] of another source (tests of the error path).
pub fn compile_source(source: &str, arch: &'static str) -> Result<String> {
    if !nvrtc_present() {
        return Err(Error::Cuda(
            "NVRTC (libnvrtc) is not installed or not on the library path".into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        // IEEE division and square roots: the norms and softmax follow the CPU's.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(true),
        name: Some("iris_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| cuda_err(&format!("compiling the kernels for {arch}"), e))?;
    Ok(ptx.to_src())
}

/// An open GPU: its context, the stream every operation runs on, the compiled kernels,
/// and cuBLASLt with its workspace.
pub(crate) struct Gpu {
    ordinal: usize,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    blas: Blas,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{})", self.ordinal)
    }
}

struct Blas {
    handle: lts::cublasLtHandle_t,
    workspace: Mutex<CudaSlice<u8>>,
    workspace_bytes: usize,
}

// SAFETY: the cuBLASLt handle is used from any thread but only under the workspace's
// lock, which serializes the calls that use both.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();

/// The `ordinal`-th GPU, opened (and its kernels compiled) on first use.
pub(crate) fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    let gpus = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut gpus = gpus
        .lock()
        .map_err(|_| Error::Cuda("device table poisoned".into()))?;
    if let Some(g) = gpus.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Arc::new(open(ordinal)?);
    gpus.insert(ordinal, g.clone());
    Ok(g)
}

/// Waits for GPU `ordinal`'s stream.
pub(crate) fn synchronize(ordinal: usize) -> Result<()> {
    gpu(ordinal)?
        .stream
        .synchronize()
        .map_err(|e| cuda_err("synchronizing", e))
}

fn open(ordinal: usize) -> Result<Gpu> {
    // SAFETY: each probe tries to load a shared library by name, nothing more.
    let present = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublaslt::sys::is_culib_present(),
        )
    };
    match present {
        (false, _) => {
            return Err(Error::Cuda(
                "no CUDA driver (libcuda) on this machine: use --device cpu".into(),
            ))
        }
        (_, false) => {
            return Err(Error::Cuda(
                "cuBLASLt (libcublasLt) is not installed or not on the library path".into(),
            ))
        }
        _ => {}
    }
    let count = CudaContext::device_count().map_err(|e| cuda_err("counting devices", e))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::Cuda(format!(
            "device cuda:{ordinal} does not exist ({count} GPU(s) here)"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("opening the device", e))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| cuda_err("reading the compute capability", e))?;
    // NVRTC takes the architecture as a 'static string: one per opened device.
    let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    let ptx = compile(arch)?;
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .map_err(|e| cuda_err("loading the kernels", e))?;
    let mut funcs = HashMap::new();
    for &name in KERNELS {
        let f = module
            .load_function(name)
            .map_err(|e| cuda_err(&format!("kernel {name}"), e))?;
        funcs.insert(name, f);
    }
    let stream = ctx.default_stream();
    let handle = lt::create_handle().map_err(|e| cuda_err("cuBLASLt", e))?;
    // NVIDIA's recommendation: 32 MiB on Hopper, 4 MiB before.
    let workspace_bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
    let workspace = stream
        .alloc_zeros::<u8>(workspace_bytes)
        .map_err(|e| cuda_err("cuBLASLt workspace", e))?;
    Ok(Gpu {
        ordinal,
        stream,
        funcs,
        blas: Blas {
            handle,
            workspace: Mutex::new(workspace),
            workspace_bytes,
        },
    })
}

impl Gpu {
    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("kernel {name} was not loaded")))
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| cuda_err("allocating device memory", e))
    }

    pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            // A zero-length allocation is not valid: keep one element, never read.
            // SAFETY: `alloc` leaves memory uninitialised; nothing reads the element.
            return unsafe { self.stream.alloc::<T>(1) }
                .map_err(|e| cuda_err("allocating device memory", e));
        }
        self.stream
            .clone_htod(v)
            .map_err(|e| cuda_err("copying to the device", e))
    }

    fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut v = self
            .stream
            .clone_dtoh(&s.slice(..n))
            .map_err(|e| cuda_err("copying to the host", e))?;
        v.truncate(n);
        Ok(v)
    }

    /// A launch over `n` elements, 256 threads a block.
    fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block of 256 threads for each of `rows` rows.
    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A launch builder with `$args` pushed, launched with `$cfg`.
macro_rules! launch {
    ($gpu:expr, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let f = $gpu.func($name)?;
        let mut b = $gpu.stream.launch_builder(f);
        $( b.arg($arg); )+
        // SAFETY: every kernel bounds-checks its index against the sizes passed, and
        // the buffers passed hold at least those sizes (checked by `Tensor` and here).
        unsafe { b.launch($cfg) }
            .map(|_| ())
            .map_err(|e| cuda_err(concat!("kernel ", $name), e))
    }};
}

/// A tensor's elements in device memory.
#[derive(Debug)]
pub(crate) enum Data {
    F32(CudaSlice<f32>),
    /// bf16 bit patterns.
    BF16(CudaSlice<u16>),
    /// f16 bit patterns.
    F16(CudaSlice<u16>),
}

#[derive(Debug)]
pub(crate) struct CudaStorage {
    pub(crate) data: Data,
    /// Elements (the allocation may be one longer for an empty tensor).
    len: usize,
    pub(crate) gpu: Arc<Gpu>,
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

impl CudaStorage {
    fn f32(gpu: &Arc<Gpu>, s: CudaSlice<f32>, len: usize) -> CudaStorage {
        CudaStorage {
            data: Data::F32(s),
            len,
            gpu: gpu.clone(),
        }
    }

    /// A host tensor copied to GPU `ordinal`.
    pub(crate) fn upload(host: &CpuStorage, ordinal: usize) -> Result<CudaStorage> {
        let gpu = gpu(ordinal)?;
        let len = host.len();
        let data = match host {
            CpuStorage::F32(v) => Data::F32(gpu.upload(v)?),
            CpuStorage::BF16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                Data::BF16(gpu.upload(&bits)?)
            }
            CpuStorage::F16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                Data::F16(gpu.upload(&bits)?)
            }
        };
        Ok(CudaStorage { data, len, gpu })
    }

    /// The f32 data; errors for 16-bit storage (activations are f32).
    fn f32_slice(&self) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            _ => Err(Error::DType {
                op: "cuda f32 operand",
                dtype: self.dtype(),
            }),
        }
    }

    /// Mutable f32 data, widening 16-bit storage on the device first.
    fn f32_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        if !matches!(self.data, Data::F32(_)) {
            *self = self.to_dtype(DType::F32)?;
        }
        match &mut self.data {
            Data::F32(s) => Ok(s),
            _ => unreachable!("widened just above"),
        }
    }

    /// An f32 copy (or the data itself when it is f32).
    fn as_f32_owned(&self) -> Result<std::borrow::Cow<'_, CudaSlice<f32>>> {
        match &self.data {
            Data::F32(s) => Ok(std::borrow::Cow::Borrowed(s)),
            _ => match self.to_dtype(DType::F32)?.data {
                Data::F32(s) => Ok(std::borrow::Cow::Owned(s)),
                _ => unreachable!("converted to f32"),
            },
        }
    }

    /// Launches `f(gpu, pointer)` with the storage as a `const void*` argument.
    fn raw(&self) -> RawArg<'_> {
        match &self.data {
            Data::F32(s) => RawArg::F32(s),
            Data::BF16(s) | Data::F16(s) => RawArg::U16(s),
        }
    }
}

/// A storage of any dtype as a kernel's `const void*`.
enum RawArg<'a> {
    F32(&'a CudaSlice<f32>),
    U16(&'a CudaSlice<u16>),
}

/// Launches with a raw-typed argument in position: expands to the launch for each
/// variant.
macro_rules! with_raw {
    ($raw:expr, |$p:ident| $body:expr) => {
        match $raw {
            RawArg::F32($p) => $body,
            RawArg::U16($p) => $body,
        }
    };
}

impl Clone for CudaStorage {
    fn clone(&self) -> Self {
        self.try_clone().expect("copying device memory")
    }
}

impl CudaStorage {
    pub(crate) fn try_clone(&self) -> Result<CudaStorage> {
        let copy = |e| cuda_err("copying device memory", e);
        let data = match &self.data {
            Data::F32(s) => Data::F32(self.gpu.stream.clone_dtod(s).map_err(copy)?),
            Data::BF16(s) => Data::BF16(self.gpu.stream.clone_dtod(s).map_err(copy)?),
            Data::F16(s) => Data::F16(self.gpu.stream.clone_dtod(s).map_err(copy)?),
        };
        Ok(CudaStorage {
            data,
            len: self.len,
            gpu: self.gpu.clone(),
        })
    }

    fn same_gpu(&self, other: &CudaStorage, op: &str) -> Result<()> {
        if Arc::ptr_eq(&self.gpu, &other.gpu) {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "{op}: operands on cuda:{} and cuda:{}",
                self.gpu.ordinal, other.gpu.ordinal
            )))
        }
    }
}

/// A column-major matrix operand of cuBLASLt: its device address, stored rows and
/// columns, leading dimension and element type.
struct Mat {
    ptr: cudarc::driver::sys::CUdeviceptr,
    rows: u64,
    cols: u64,
    ld: i64,
    ty: lts::cudaDataType,
}

impl Mat {
    /// A column-major `rows × cols` matrix stored densely (leading dimension `rows`).
    fn dense(
        ptr: cudarc::driver::sys::CUdeviceptr,
        rows: usize,
        cols: usize,
        ty: lts::cudaDataType,
    ) -> Mat {
        Mat {
            ptr,
            rows: rows as u64,
            cols: cols as u64,
            ld: rows as i64,
            ty,
        }
    }
}

/// `D = op(A) · B` (column-major; `op` transposes A when `trans_a`), f32 scale and
/// accumulation (`compute`), D f32.
fn gemm(
    gpu: &Gpu,
    compute: lts::cublasComputeType_t,
    trans_a: bool,
    a: Mat,
    b: Mat,
    d: Mat,
) -> Result<()> {
    let err = |e| cuda_err("cuBLASLt matmul", e);
    let ws = gpu
        .blas
        .workspace
        .lock()
        .map_err(|_| Error::Cuda("cuBLASLt workspace poisoned".into()))?;
    // cuBLASLt runs in the calling thread's current context: the engine's thread is
    // not the one that opened the device.
    gpu.stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the context", e))?;
    // SAFETY: every handle made here is destroyed before returning; the pointers are
    // live device allocations of at least the described sizes (callers check shapes),
    // and the workspace lock serializes the calls sharing the workspace.
    unsafe {
        let desc = lt::create_matmul_desc(compute, lts::cudaDataType_t::CUDA_R_32F).map_err(err)?;
        let ta = trans_a as i32;
        let la = lt::create_matrix_layout(a.ty, a.rows, a.cols, a.ld).map_err(err)?;
        let lb = lt::create_matrix_layout(b.ty, b.rows, b.cols, b.ld).map_err(err)?;
        let ld = lt::create_matrix_layout(d.ty, d.rows, d.cols, d.ld).map_err(err)?;
        let pref = lt::create_matmul_pref().map_err(err)?;
        let ws_bytes = gpu.blas.workspace_bytes;
        let run = (|| {
            lt::set_matmul_desc_attribute(
                desc,
                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&ta) as *const i32 as *const _,
                std::mem::size_of::<i32>(),
            )?;
            lt::set_matmul_pref_attribute(
                pref,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws_bytes) as *const usize as *const _,
                std::mem::size_of::<usize>(),
            )?;
            let heur = lt::get_matmul_algo_heuristic(gpu.blas.handle, desc, la, lb, ld, ld, pref)?;
            let (w, _w) = ws.device_ptr(&gpu.stream);
            let (alpha, beta) = (1.0f32, 0.0f32);
            lt::matmul(
                gpu.blas.handle,
                desc,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                a.ptr as *const _,
                la,
                b.ptr as *const _,
                lb,
                d.ptr as *const _,
                ld,
                d.ptr as *mut _,
                ld,
                (&heur.algo) as *const _,
                w as *mut _,
                ws_bytes,
                gpu.stream.cu_stream() as *mut _,
            )
        })();
        let _ = lt::destroy_matmul_pref(pref);
        let _ = lt::destroy_matrix_layout(ld);
        let _ = lt::destroy_matrix_layout(lb);
        let _ = lt::destroy_matrix_layout(la);
        let _ = lt::destroy_matmul_desc(desc);
        run.map_err(err)
    }
}

/// The cuBLASLt element type of a storage.
fn blas_type(d: DType) -> lts::cudaDataType {
    match d {
        DType::F32 => lts::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => lts::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => lts::cudaDataType_t::CUDA_R_16F,
    }
}

/// The device address of a storage, and the guard that orders the stream after it.
macro_rules! ptr_of {
    ($s:expr, $stream:expr) => {
        match &$s.data {
            Data::F32(x) => x.device_ptr($stream),
            Data::BF16(x) | Data::F16(x) => x.device_ptr($stream),
        }
    };
}

impl BackendStorage for CudaStorage {
    fn device(&self) -> Device {
        Device::Cuda(self.gpu.ordinal)
    }

    fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::BF16(_) => DType::BF16,
            Data::F16(_) => DType::F16,
        }
    }

    fn try_clone(&self) -> Result<Self> {
        CudaStorage::try_clone(self)
    }

    fn to_cpu(&self) -> Result<CpuStorage> {
        let n = self.len;
        Ok(match &self.data {
            Data::F32(s) => CpuStorage::F32(self.gpu.download(s, n)?),
            Data::BF16(s) => CpuStorage::BF16(
                self.gpu
                    .download(s, n)?
                    .into_iter()
                    .map(half::bf16::from_bits)
                    .collect(),
            ),
            Data::F16(s) => CpuStorage::F16(
                self.gpu
                    .download(s, n)?
                    .into_iter()
                    .map(half::f16::from_bits)
                    .collect(),
            ),
        })
    }

    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let (g, n) = (&self.gpu, self.len);
        if dtype == self.dtype() {
            return self.try_clone();
        }
        // Through f32: 16-bit to 16-bit is widened first (exact), then rounded.
        let wide = match &self.data {
            Data::F32(s) => std::borrow::Cow::Borrowed(s),
            other => {
                let mut out = g.zeros::<f32>(n)?;
                let code = dtype_code(self.dtype());
                let raw = match other {
                    Data::BF16(s) | Data::F16(s) => s,
                    Data::F32(_) => unreachable!("matched above"),
                };
                launch!(g, "to_f32", Gpu::elementwise(n), raw, &mut out, &n, &code)?;
                std::borrow::Cow::Owned(out)
            }
        };
        if dtype == DType::F32 {
            return Ok(CudaStorage::f32(g, wide.into_owned(), n));
        }
        let mut out = g.zeros::<u16>(n)?;
        let code = dtype_code(dtype);
        launch!(
            g,
            "f32_to_half",
            Gpu::elementwise(n),
            &*wide,
            &mut out,
            &n,
            &code
        )?;
        Ok(CudaStorage {
            data: if dtype == DType::BF16 {
                Data::BF16(out)
            } else {
                Data::F16(out)
            },
            len: n,
            gpu: g.clone(),
        })
    }

    fn round_to(&mut self, dtype: DType) -> Result<()> {
        let (g, n) = (self.gpu.clone(), self.len);
        let code = dtype_code(dtype);
        let x = self.f32_mut()?;
        launch!(g, "round_in_place", Gpu::elementwise(n), x, &n, &code)
    }

    fn unary(&mut self, op: Unary) -> Result<()> {
        let (g, n) = (self.gpu.clone(), self.len);
        let (code, a): (i32, f32) = match op {
            Unary::Activation(Activation::Gelu) => (0, 0.0),
            Unary::Activation(Activation::GeluTanh) => (1, 0.0),
            Unary::Activation(Activation::QuickGelu) => (2, 0.0),
            Unary::Activation(Activation::Silu) => (3, 0.0),
            Unary::Activation(Activation::Relu) => (4, 0.0),
            Unary::Scale(s) => (5, s),
            Unary::Tanh => (6, 0.0),
        };
        let x = self.f32_mut()?;
        launch!(g, "unary", Gpu::elementwise(n), x, &n, &code, &a)
    }

    fn binary(&mut self, rhs: &Self, op: Binary) -> Result<()> {
        self.same_gpu(rhs, "binary")?;
        let (g, n) = (self.gpu.clone(), self.len);
        let code = op as i32;
        let bd = dtype_code(rhs.dtype());
        let raw = rhs.raw();
        let x = self.f32_mut()?;
        with_raw!(raw, |b| launch!(
            g,
            "binary",
            Gpu::elementwise(n),
            x,
            b,
            &n,
            &code,
            &bd
        ))
    }

    fn binary_row(&mut self, d: usize, row: &Self, op: Binary) -> Result<()> {
        self.same_gpu(row, "binary_row")?;
        let (g, n) = (self.gpu.clone(), self.len);
        let (code, rd, rl) = (op as i32, dtype_code(row.dtype()), row.len);
        let raw = row.raw();
        let x = self.f32_mut()?;
        with_raw!(raw, |r| launch!(
            g,
            "binary_row",
            Gpu::elementwise(n),
            x,
            r,
            &n,
            &d,
            &rl,
            &code,
            &rd
        ))
    }

    fn layer_norm(&mut self, d: usize, w: &Self, b: Option<&Self>, eps: f64) -> Result<()> {
        self.same_gpu(w, "layer_norm")?;
        let (g, rows) = (self.gpu.clone(), self.len / d.max(1));
        // The bias in the weight's dtype (the kernel reads both with one code).
        let b = b.map(|b| b.to_dtype(w.dtype())).transpose()?;
        let (wd, has_bias, eps) = (dtype_code(w.dtype()), b.is_some() as i32, eps as f32);
        let (wr, br) = (w.raw(), b.as_ref().unwrap_or(w).raw());
        let x = self.f32_mut()?;
        with_raw!(wr, |wp| with_raw!(br, |bp| launch!(
            g,
            "layer_norm",
            Gpu::per_row(rows),
            x,
            wp,
            bp,
            &d,
            &eps,
            &wd,
            &has_bias
        )))
    }

    fn rms_norm(&mut self, d: usize, w: &Self, eps: f64, round: DType) -> Result<()> {
        self.same_gpu(w, "rms_norm")?;
        let (g, rows) = (self.gpu.clone(), self.len / d.max(1));
        let (wd, rd, eps) = (dtype_code(w.dtype()), dtype_code(round), eps as f32);
        let wr = w.raw();
        let x = self.f32_mut()?;
        with_raw!(wr, |wp| launch!(
            g,
            "rms_norm",
            Gpu::per_row(rows),
            x,
            wp,
            &d,
            &eps,
            &wd,
            &rd
        ))
    }

    fn softmax(&mut self, d: usize) -> Result<()> {
        let (g, rows) = (self.gpu.clone(), self.len / d.max(1));
        let x = self.f32_mut()?;
        launch!(g, "softmax_rows", Gpu::per_row(rows), x, &d)
    }

    fn l2_normalize(&mut self, d: usize) -> Result<()> {
        let (g, rows) = (self.gpu.clone(), self.len / d.max(1));
        let x = self.f32_mut()?;
        launch!(g, "l2_normalize_rows", Gpu::per_row(rows), x, &d)
    }

    fn matmul(&self, m: usize, k: usize, rhs: &Self, n: usize) -> Result<Self> {
        self.same_gpu(rhs, "matmul")?;
        let g = &self.gpu;
        let (a, b) = (self.as_f32_owned()?, rhs.as_f32_owned()?);
        let mut out = g.zeros::<f32>(m * n)?;
        {
            let s = &g.stream;
            let (pa, _ga) = a.device_ptr(s);
            let (pb, _gb) = b.device_ptr(s);
            let (po, _go) = out.device_ptr_mut(s);
            // Row-major C[m,n] = A·B is column-major Cᵀ[n,m] = Bᵀ·Aᵀ, where the
            // row-major B is the column-major Bᵀ [n,k] and A the column-major Aᵀ [k,m].
            let f = lts::cudaDataType_t::CUDA_R_32F;
            gemm(
                g,
                lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                false,
                Mat::dense(pb, n, k, f),
                Mat::dense(pa, k, m, f),
                Mat::dense(po, n, m, f),
            )?;
        }
        Ok(CudaStorage::f32(g, out, m * n))
    }

    fn linear(&self, m: usize, k: usize, w: &Self, n: usize, b: Option<&Self>) -> Result<Self> {
        self.same_gpu(w, "linear")?;
        let g = &self.gpu;
        // A 16-bit weight multiplies activations rounded to its dtype (PyTorch's bf16
        // matmul takes bf16 inputs); sums and the output are f32, f32 weights in f32.
        let x = if self.dtype() == w.dtype() {
            std::borrow::Cow::Borrowed(self)
        } else {
            std::borrow::Cow::Owned(self.to_dtype(w.dtype())?)
        };
        let mut out = g.zeros::<f32>(m * n)?;
        {
            let s = &g.stream;
            let (px, _gx) = ptr_of!(x, s);
            let (pw, _gw) = ptr_of!(w, s);
            let (po, _go) = out.device_ptr_mut(s);
            let t = blas_type(w.dtype());
            // Row-major Y[m,n] = X·Wᵀ is column-major Yᵀ[n,m] = W·Xᵀ: W row-major [n,k]
            // is column-major [k,n], transposed; X row-major is column-major [k,m].
            gemm(
                g,
                lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                true,
                Mat::dense(pw, k, n, t),
                Mat::dense(px, k, m, t),
                Mat::dense(po, n, m, lts::cudaDataType_t::CUDA_R_32F),
            )?;
        }
        let mut y = CudaStorage::f32(g, out, m * n);
        if let Some(b) = b {
            y.binary_row(n, b, Binary::Add)?;
        }
        Ok(y)
    }

    fn gather_rows(&self, d: usize, ids: &[u32]) -> Result<Self> {
        let g = &self.gpu;
        let n_ids = ids.len();
        let ids = g.upload(ids)?;
        let mut out = g.zeros::<f32>(n_ids * d)?;
        let code = dtype_code(self.dtype());
        with_raw!(self.raw(), |t| launch!(
            g,
            "gather_rows",
            Gpu::elementwise(n_ids * d),
            t,
            &ids,
            &mut out,
            &n_ids,
            &d,
            &code
        ))?;
        Ok(CudaStorage::f32(g, out, n_ids * d))
    }

    fn narrow_rows(&self, d: usize, start: usize, len: usize) -> Result<Self> {
        let g = &self.gpu;
        let r = start * d..(start + len) * d;
        let copy = |e| cuda_err("copying device memory", e);
        let n = len * d;
        let data = match &self.data {
            Data::F32(s) if n > 0 => Data::F32(g.stream.clone_dtod(&s.slice(r)).map_err(copy)?),
            Data::BF16(s) if n > 0 => Data::BF16(g.stream.clone_dtod(&s.slice(r)).map_err(copy)?),
            Data::F16(s) if n > 0 => Data::F16(g.stream.clone_dtod(&s.slice(r)).map_err(copy)?),
            Data::F32(_) => Data::F32(g.zeros(0)?),
            Data::BF16(_) => Data::BF16(g.zeros(0)?),
            Data::F16(_) => Data::F16(g.zeros(0)?),
        };
        Ok(CudaStorage {
            data,
            len: n,
            gpu: g.clone(),
        })
    }

    fn narrow_cols(&self, d: usize, start: usize, len: usize) -> Result<Self> {
        let g = &self.gpu;
        let rows = self.len / d.max(1);
        let n = rows * len;
        // One kernel for both element sizes (it copies `es`-byte elements).
        fn cols<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
            g: &Gpu,
            src: &CudaSlice<T>,
            (rows, d, start, len): (usize, usize, usize, usize),
        ) -> Result<CudaSlice<T>> {
            let es = std::mem::size_of::<T>() as i32;
            let mut out = g.zeros::<T>(rows * len)?;
            let cfg = Gpu::elementwise(rows * len);
            launch!(
                g,
                "narrow_cols",
                cfg,
                src,
                &mut out,
                &rows,
                &d,
                &start,
                &len,
                &es
            )?;
            Ok(out)
        }
        let dims = (rows, d, start, len);
        let data = match &self.data {
            Data::F32(s) => Data::F32(cols(g, s, dims)?),
            Data::BF16(s) => Data::BF16(cols(g, s, dims)?),
            Data::F16(s) => Data::F16(cols(g, s, dims)?),
        };
        Ok(CudaStorage {
            data,
            len: n,
            gpu: g.clone(),
        })
    }

    fn cat_rows(parts: &[&Self]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::Cuda("cat_rows of nothing".into()));
        };
        let g = &first.gpu;
        let total: usize = parts.iter().map(|p| p.len).sum();
        let mut out = g.zeros::<f32>(total)?;
        let mut at = 0;
        for p in parts {
            first.same_gpu(p, "cat_rows")?;
            if p.len == 0 {
                continue;
            }
            let src = p.as_f32_owned()?;
            let mut dst = out.slice_mut(at..at + p.len);
            g.stream
                .memcpy_dtod(&src.slice(..p.len), &mut dst)
                .map_err(|e| cuda_err("copying device memory", e))?;
            at += p.len;
        }
        Ok(CudaStorage::f32(g, out, total))
    }

    fn cat_cols(parts: &[(&Self, usize)], rows: usize) -> Result<Self> {
        let Some((first, _)) = parts.first() else {
            return Err(Error::Cuda("cat_cols of nothing".into()));
        };
        let g = &first.gpu;
        let d: usize = parts.iter().map(|p| p.1).sum();
        let mut out = g.zeros::<f32>(rows * d)?;
        let mut at = 0usize;
        for (p, w) in parts {
            first.same_gpu(p, "cat_cols")?;
            let src = p.as_f32_owned()?;
            let w = *w;
            launch!(
                g,
                "put_cols",
                Gpu::elementwise(rows * w),
                &*src,
                &mut out,
                &rows,
                &w,
                &d,
                &at
            )?;
            at += w;
        }
        Ok(CudaStorage::f32(g, out, rows * d))
    }

    fn scatter_rows(&mut self, d: usize, at: &[usize], src: &Self) -> Result<()> {
        self.same_gpu(src, "scatter_rows")?;
        let g = self.gpu.clone();
        let n = at.len();
        let at: Vec<u32> = at.iter().map(|&r| r as u32).collect();
        let at = g.upload(&at)?;
        let s = src.as_f32_owned()?;
        let x = self.f32_mut()?;
        launch!(
            g,
            "scatter_rows",
            Gpu::elementwise(n * d),
            x,
            &*s,
            &at,
            &n,
            &d
        )
    }

    fn patches(&self, c: usize, s: usize, p: usize) -> Result<Self> {
        let g = &self.gpu;
        let gr = s / p;
        let n = gr * gr * c * p * p;
        let px = self.as_f32_owned()?;
        let mut out = g.zeros::<f32>(n)?;
        launch!(
            g,
            "patches",
            Gpu::elementwise(n),
            &*px,
            &mut out,
            &c,
            &s,
            &p
        )?;
        Ok(CudaStorage::f32(g, out, n))
    }

    fn rope(
        &mut self,
        d: usize,
        cos: &Self,
        sin: &Self,
        n_heads: usize,
        round: DType,
    ) -> Result<()> {
        self.same_gpu(cos, "rope")?;
        let g = self.gpu.clone();
        let rows = self.len / d.max(1);
        let half = d / (2 * n_heads.max(1));
        let code = dtype_code(round);
        let (c, s) = (cos.f32_slice()?, sin.f32_slice()?);
        let x = self.f32_mut()?;
        launch!(
            g,
            "rope",
            Gpu::elementwise(rows * n_heads * half),
            x,
            c,
            s,
            &rows,
            &n_heads,
            &half,
            &code
        )
    }

    fn attention(
        q: &Self,
        k: &Self,
        v: &Self,
        s: AttnShape,
        causal: Option<usize>,
        blocks: usize,
    ) -> Result<Self> {
        q.same_gpu(k, "attention")?;
        q.same_gpu(v, "attention")?;
        check_heads(s)?;
        let g = &q.gpu;
        let (qw, kw) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
        let blocks = blocks.max(1);
        let (tq, tk) = (q.len / qw / blocks, k.len / kw / blocks);
        let (q, k, v) = (q.as_f32_owned()?, k.as_f32_owned()?, v.as_f32_owned()?);
        let mut out = g.zeros::<f32>(blocks * tq * qw)?;
        let causal: i64 = causal.map_or(-1, |c| c as i64);
        let cfg = LaunchConfig {
            grid_dim: ((blocks * tq).max(1) as u32, s.n_kv_heads as u32, 1),
            block_dim: (32 * (s.n_heads / s.n_kv_heads) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads, kv_heads, hd) = (s.n_heads, s.n_kv_heads, s.head_dim);
        if blocks * tq > 0 {
            launch!(
                g,
                "attention",
                cfg,
                &*q,
                &*k,
                &*v,
                &mut out,
                &tq,
                &tk,
                &heads,
                &kv_heads,
                &hd,
                &causal
            )?;
        }
        Ok(CudaStorage::f32(g, out, blocks * tq * qw))
    }

    fn first_non_finite(&self) -> Result<Option<(usize, f32)>> {
        let g = &self.gpu;
        let x = self.as_f32_owned()?;
        let n = self.len;
        let mut at = g.upload(&[n as u64])?;
        launch!(g, "first_non_finite", Gpu::elementwise(n), &*x, &n, &mut at)?;
        let i = g.download(&at, 1)?[0] as usize;
        if i >= n {
            return Ok(None);
        }
        let v = g
            .stream
            .clone_dtoh(&x.slice(i..i + 1))
            .map_err(|e| cuda_err("copying to the host", e))?[0];
        Ok(Some((i, v)))
    }
}

/// The head layout the attention kernels take: query heads a multiple of KV heads, at
/// most 32 query heads a KV head (a block of warps), head dims up to 256.
fn check_heads(s: AttnShape) -> Result<()> {
    let group = s.n_heads / s.n_kv_heads.max(1);
    if s.n_kv_heads == 0 || group == 0 || group > 32 || s.head_dim > 256 {
        return Err(Error::Cuda(format!(
            "attention with {} heads over {} KV heads of {}: the kernels take up to 32 \
             query heads a KV head and head dims up to 256",
            s.n_heads, s.n_kv_heads, s.head_dim
        )));
    }
    Ok(())
}

impl CudaStorage {
    /// Each row's largest value (first on ties) and its log-probability, on the
    /// device: a greedy decode step copies back ids and one float a row.
    pub(crate) fn argmax_rows(&self, d: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let g = &self.gpu;
        let rows = self.len / d.max(1);
        let x = self.as_f32_owned()?;
        let mut ids = g.zeros::<u32>(rows)?;
        let mut lps = g.zeros::<f32>(rows)?;
        launch!(
            g,
            "argmax_rows",
            Gpu::per_row(rows),
            &*x,
            &d,
            &mut ids,
            &mut lps
        )?;
        Ok((g.download(&ids, rows)?, g.download(&lps, rows)?))
    }
}

impl CudaStorage {
    /// `elems` zeros of a KV arena's dtype on GPU `ordinal`.
    pub(crate) fn zeros(
        ordinal: usize,
        elems: usize,
        dtype: crate::kv::KvDtype,
    ) -> Result<CudaStorage> {
        let g = gpu(ordinal)?;
        let data = match dtype {
            crate::kv::KvDtype::F32 => Data::F32(g.zeros(elems)?),
            crate::kv::KvDtype::Bf16 => Data::BF16(g.zeros(elems)?),
        };
        Ok(CudaStorage {
            data,
            len: elems,
            gpu: g,
        })
    }

    pub(crate) fn device_of(&self) -> Device {
        Device::Cuda(self.gpu.ordinal)
    }
}

/// A tensor's CUDA storage, or the error naming where it is.
fn on_gpu<'a>(t: &'a crate::Tensor, what: &str) -> Result<&'a CudaStorage> {
    match &*t.storage {
        crate::storage::Storage::Cuda(s) => Ok(s),
        crate::storage::Storage::Cpu(_) => Err(Error::Device(format!("{what} on the host"))),
    }
}

/// [`crate::kv::KvCache::write_batch`] into a GPU arena: sequence `i`'s rows of `k`
/// and `v` (f32 on the arena's GPU) at its positions `len()..`, through its table.
pub(crate) fn kv_write_batch(
    caches: &mut [&mut crate::kv::KvCache],
    rows: &[usize],
    layer: usize,
    k: &crate::Tensor,
    v: &crate::Tensor,
) -> Result<()> {
    let (ks, vs) = (on_gpu(k, "keys")?, on_gpu(v, "values")?);
    let (kf, vf) = (ks.as_f32_owned()?, vs.as_f32_owned()?);
    let w = k.last_dim();
    let mut r0 = 0usize;
    for (cache, &t) in caches.iter_mut().zip(rows) {
        let start = cache.len();
        let (arena, table) = cache
            .paged_parts()
            .ok_or_else(|| Error::Kv("a GPU write into a cache without blocks".into()))?;
        let ga = arena
            .gpu()
            .ok_or_else(|| Error::Kv("a GPU write into a host arena".into()))?;
        if ga.width != w {
            return Err(Error::Kv(format!(
                "rows of {w} values in a layer of {}",
                ga.width
            )));
        }
        if start + t > table.len() * arena.block_size() {
            return Err(Error::Kv(format!(
                "paged KV cache: position {} past the block table",
                start + t
            )));
        }
        if t == 0 {
            continue;
        }
        let mut l = ga.layers[layer]
            .write()
            .map_err(|_| Error::Kv("kv arena lock poisoned".into()))?;
        ks.same_gpu(&l, "kv write")?;
        let g = ks.gpu.clone();
        let table = g.upload(table)?;
        let (kr, vr) = (
            kf.slice(r0 * w..(r0 + t) * w),
            vf.slice(r0 * w..(r0 + t) * w),
        );
        let (bs, code) = (arena.block_size(), dtype_code(l.dtype()));
        let cfg = Gpu::elementwise(t * w);
        match &mut l.data {
            Data::F32(a) => {
                launch!(g, "kv_write", cfg, a, &table, &kr, &vr, &t, &start, &w, &bs, &code)?
            }
            Data::BF16(a) | Data::F16(a) => {
                launch!(g, "kv_write", cfg, a, &table, &kr, &vr, &t, &start, &w, &bs, &code)?
            }
        }
        r0 += t;
    }
    Ok(())
}

/// [`crate::attention::attention_cached`] over a GPU arena: one kernel for the whole
/// step, a block per (query row, KV head), its warps that KV head's query heads.
pub(crate) fn paged_attention(
    q: &crate::Tensor,
    caches: &[&mut crate::kv::KvCache],
    rows: &[usize],
    layer: usize,
    s: AttnShape,
) -> Result<crate::Tensor> {
    check_heads(s)?;
    let qs = on_gpu(q, "queries")?;
    let g = qs.gpu.clone();
    let (mut tables, mut table_at, mut seq_of, mut first, mut cached) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut arena = None;
    let mut r0 = 0u32;
    for (i, (c, &t)) in caches.iter().zip(rows).enumerate() {
        let (a, table) = c
            .paged_parts()
            .ok_or_else(|| Error::Kv("paged attention over a cache without blocks".into()))?;
        match arena {
            None => arena = Some(a.clone()),
            Some(ref x) if !Arc::ptr_eq(x, a) => {
                return Err(Error::Kv("one step's caches in two arenas".into()))
            }
            _ => {}
        }
        table_at.push(tables.len() as u32);
        tables.extend_from_slice(table);
        first.push(r0);
        cached.push(c.len() as u32);
        seq_of.extend(std::iter::repeat_n(i as u32, t));
        r0 += t as u32;
    }
    let arena = arena.ok_or_else(|| Error::Kv("paged attention over no caches".into()))?;
    let ga = arena
        .gpu()
        .ok_or_else(|| Error::Kv("paged attention over a host arena".into()))?;
    let l = ga.layers[layer]
        .read()
        .map_err(|_| Error::Kv("kv arena lock poisoned".into()))?;
    qs.same_gpu(&l, "paged attention")?;
    let total = r0 as usize;
    let qw = s.n_heads * s.head_dim;
    let qf = qs.as_f32_owned()?;
    let mut out = g.zeros::<f32>(total * qw)?;
    if total > 0 {
        let (tables, table_at, seq_of, first, cached) = (
            g.upload(&tables)?,
            g.upload(&table_at)?,
            g.upload(&seq_of)?,
            g.upload(&first)?,
            g.upload(&cached)?,
        );
        let cfg = LaunchConfig {
            grid_dim: (total as u32, s.n_kv_heads as u32, 1),
            block_dim: (32 * (s.n_heads / s.n_kv_heads) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (bs, heads, kv_heads, hd) = (arena.block_size(), s.n_heads, s.n_kv_heads, s.head_dim);
        let code = dtype_code(l.dtype());
        with_raw!(l.raw(), |a| launch!(
            g,
            "paged_attention",
            cfg,
            &*qf,
            a,
            &mut out,
            &tables,
            &table_at,
            &seq_of,
            &first,
            &cached,
            &bs,
            &heads,
            &kv_heads,
            &hd,
            &code
        ))?;
    }
    Ok(crate::Tensor::new(
        crate::storage::Storage::Cuda(CudaStorage::f32(&g, out, total * qw)),
        vec![total, qw],
    ))
}

/// Greedy draws on the device: each row's argmax and its log-probability.
pub(crate) fn argmax_rows(logits: &crate::Tensor) -> Result<(Vec<u32>, Vec<f32>)> {
    on_gpu(logits, "logits")?.argmax_rows(logits.last_dim())
}

/// Top log-probabilities the sampling kernel returns a row (OpenAI allows 20).
const TOP_LOGPROBS: usize = 20;

/// The device's draws for `draws` (one a row of `[rows, vocab]` logits), as
/// `iris_tensor::sample`'s host sampler draws them; `None` for a row the kernel hands
/// back (its nucleus reaches past the candidates): the caller draws it on the host.
pub(crate) fn sample_rows(
    logits: &crate::Tensor,
    draws: &[crate::sample::Draw<'_>],
) -> Result<Vec<Option<crate::sample::Drawn>>> {
    let x = on_gpu(logits, "logits")?;
    let g = &x.gpu;
    let (rows, d) = (logits.rows(), logits.last_dim());
    let xf = x.as_f32_owned()?;
    let p = |f: &dyn Fn(&crate::sample::SamplingParams) -> f32| -> Vec<f32> {
        draws.iter().map(|dr| f(&dr.sampler.params)).collect()
    };
    let (temperature, top_p, min_p) = (
        g.upload(&p(&|s| s.temperature))?,
        g.upload(&p(&|s| s.top_p))?,
        g.upload(&p(&|s| s.min_p))?,
    );
    let top_k: Vec<u32> = draws
        .iter()
        .map(|dr| dr.sampler.params.top_k.min(u32::MAX as usize) as u32)
        .collect();
    let top_k = g.upload(&top_k)?;
    let seed: Vec<u64> = draws.iter().map(|dr| dr.sampler.params.seed).collect();
    let position: Vec<u64> = draws.iter().map(|dr| dr.position as u64).collect();
    let (seed, position) = (g.upload(&seed)?, g.upload(&position)?);
    let n_top = draws
        .iter()
        .map(|dr| dr.top_logprobs)
        .max()
        .unwrap_or(0)
        .min(TOP_LOGPROBS) as u32;
    let mut ids = g.zeros::<u32>(rows)?;
    let mut lps = g.zeros::<f32>(rows)?;
    let mut status = g.zeros::<u32>(rows)?;
    let mut top_ids = g.zeros::<u32>(rows * TOP_LOGPROBS)?;
    let mut top_lps = g.zeros::<f32>(rows * TOP_LOGPROBS)?;
    let cfg = LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        g,
        "sample_rows",
        cfg,
        &*xf,
        &d,
        &temperature,
        &top_k,
        &top_p,
        &min_p,
        &seed,
        &position,
        &n_top,
        &mut ids,
        &mut lps,
        &mut status,
        &mut top_ids,
        &mut top_lps
    )?;
    let (ids, lps, status) = (
        g.download(&ids, rows)?,
        g.download(&lps, rows)?,
        g.download(&status, rows)?,
    );
    let (top_ids, top_lps) = if n_top > 0 {
        (
            g.download(&top_ids, rows * TOP_LOGPROBS)?,
            g.download(&top_lps, rows * TOP_LOGPROBS)?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok((0..rows)
        .map(|r| {
            (status[r] == 0).then(|| crate::sample::Drawn {
                id: ids[r],
                logprob: lps[r],
                top_logprobs: (0..draws[r].top_logprobs.min(TOP_LOGPROBS).min(d))
                    .map(|i| (top_ids[r * TOP_LOGPROBS + i], top_lps[r * TOP_LOGPROBS + i]))
                    .collect(),
            })
        })
        .collect())
}

/// cudarc, for the crates that drive the same devices (iris-comm's NCCL).
pub use cudarc;

/// GPU `ordinal`'s stream (every operation of the backend runs on it).
pub fn stream_of(ordinal: usize) -> Result<Arc<CudaStream>> {
    Ok(gpu(ordinal)?.stream.clone())
}

/// A copy of a GPU tensor's values as f32 device memory (widened when 16-bit).
pub fn f32_copy(t: &crate::Tensor) -> Result<CudaSlice<f32>> {
    let s = on_gpu(t, "a device copy")?;
    let f = s.as_f32_owned()?;
    match f {
        std::borrow::Cow::Owned(v) => Ok(v),
        std::borrow::Cow::Borrowed(v) => s
            .gpu
            .stream
            .clone_dtod(v)
            .map_err(|e| cuda_err("copying device memory", e)),
    }
}

/// A tensor of `shape` over f32 device memory of GPU `ordinal`.
pub fn from_f32(data: CudaSlice<f32>, shape: &[usize], ordinal: usize) -> Result<crate::Tensor> {
    let n: usize = shape.iter().product();
    if data.len() < n {
        return Err(Error::ElementCount {
            shape: shape.to_vec(),
            want: n,
            got: data.len(),
        });
    }
    let g = gpu(ordinal)?;
    Ok(crate::Tensor::new(
        crate::storage::Storage::Cuda(CudaStorage::f32(&g, data, n)),
        shape.to_vec(),
    ))
}
