//! Blobs in an S3-compatible object store, shared by deployer replicas:
//! `--blob-store s3://BUCKET?endpoint=URL&region=REGION`, with the usual `AWS_ACCESS_KEY_ID`
//! and `AWS_SECRET_ACCESS_KEY`. Objects are named `sha256/<hex>`. Each replica serves a local
//! copy (in DATA_DIR/blobs), fetched from the bucket and hashed on its way in: nothing read
//! from the bucket is served or trusted unless it hashes to its name.

use std::future::Future;
use std::path::Path;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};

use super::blobs::is_blob_name;
use super::{BlobCheck, BlobFile, BlobPut, BlobStore, FsBlobStore, Result, StoreError};

pub struct S3BlobStore {
    s3: AmazonS3,
    bucket: String,
    /// Verified local copies: what the server streams to agents.
    cache: FsBlobStore,
    /// Drives the object store's async client for this store's synchronous callers (taken
    /// out on drop).
    runtime: Option<tokio::runtime::Runtime>,
    /// One fetch from the bucket at a time: a wave of agents asking a replica for a blob it has
    /// not cached waits for one download, not one each.
    fetching: std::sync::Mutex<()>,
}

impl Drop for S3BlobStore {
    fn drop(&mut self) {
        // Dropped inside the server's runtime at shutdown, where a runtime may not block.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn s3_error(what: String) -> impl FnOnce(object_store::Error) -> StoreError {
    move |e| StoreError::Blobs(format!("{what}: {}", muscle_protocol::causes(&e)))
}

impl S3BlobStore {
    /// Opens `s3://BUCKET?endpoint=URL&region=REGION` with the credentials in the environment;
    /// local copies go to `data_dir`.
    pub fn open(url: &str, data_dir: &Path) -> Result<S3BlobStore> {
        S3BlobStore::open_with(url, data_dir, AmazonS3Builder::from_env())
    }

    fn open_with(url: &str, data_dir: &Path, builder: AmazonS3Builder) -> Result<S3BlobStore> {
        let bad = |why: String| StoreError::Blobs(format!("--blob-store {url}: {why}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let bucket = match (parsed.scheme(), parsed.host_str()) {
            ("s3", Some(bucket)) if parsed.path().trim_matches('/').is_empty() => bucket.to_owned(),
            _ => return Err(bad("expected s3://BUCKET?endpoint=URL&region=REGION".into())),
        };
        let mut builder = builder.with_bucket_name(&bucket);
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        for (key, value) in parsed.query_pairs() {
            builder = match key.as_ref() {
                "endpoint" => builder
                    .with_allow_http(value.starts_with("http://"))
                    .with_endpoint(value.as_ref()),
                "region" => builder.with_region(value.as_ref()),
                other => return Err(bad(format!("unknown setting {other:?} (endpoint, region)"))),
            };
        }
        let s3 = builder
            .build()
            .map_err(s3_error(format!("--blob-store {url}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                path: "a runtime for S3".into(),
                source,
            })?;
        Ok(S3BlobStore {
            s3,
            bucket,
            cache: FsBlobStore::open(data_dir)?,
            runtime: Some(runtime),
            fetching: std::sync::Mutex::new(()),
        })
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        let runtime = self.runtime.as_ref().expect("only taken on drop");
        super::off_async(|| runtime.block_on(f))
    }

    fn key(sha256: &str) -> Key {
        Key::from(format!("sha256/{sha256}"))
    }

    /// The object's bytes, `None` when there is no such object.
    fn get(&self, sha256: &str) -> Result<Option<bytes::Bytes>> {
        let what = format!("reading s3://{}/sha256/{sha256}", self.bucket);
        self.block(async {
            match self.s3.get(&Self::key(sha256)).await {
                Ok(got) => Ok(Some(got.bytes().await.map_err(s3_error(what))?)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(s3_error(what)(e)),
            }
        })
    }

    fn upload(&self, sha256: &str, bytes: &[u8]) -> Result<()> {
        let what = format!("writing s3://{}/sha256/{sha256}", self.bucket);
        let payload = PutPayload::from(bytes.to_vec());
        self.block(self.s3.put(&Self::key(sha256), payload))
            .map_err(s3_error(what))?;
        Ok(())
    }
}

impl BlobStore for S3BlobStore {
    fn put(&self, bytes: &[u8]) -> Result<(String, BlobPut)> {
        let (sha256, _) = self.cache.put(bytes)?;
        // What the bucket holds under that name is read back and hashed, never trusted.
        let outcome = match self.get(&sha256)? {
            Some(stored) if muscle_protocol::sha256_hex(&stored) == sha256 => {
                return Ok((sha256, BlobPut::AlreadyThere))
            }
            Some(_) => BlobPut::Repaired,
            None => BlobPut::Stored,
        };
        self.upload(&sha256, bytes)?;
        Ok((sha256, outcome))
    }

    fn open(&self, sha256: &str) -> Result<Option<BlobFile>> {
        if !is_blob_name(sha256) {
            return Ok(None);
        }
        let cached = || match self.cache.open(sha256) {
            Ok(Some(file)) => Ok(Some(file)),
            // Not here yet, or damaged here: the bucket's copy replaces it.
            Ok(None) | Err(StoreError::Damaged { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        if let Some(file) = cached()? {
            return Ok(Some(file));
        }
        let _one_fetch = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // Fetched by the one this waited for?
        if let Some(file) = cached()? {
            return Ok(Some(file));
        }
        let Some(bytes) = self.get(sha256)? else {
            return Ok(None);
        };
        if muscle_protocol::sha256_hex(&bytes) != sha256 {
            return Err(StoreError::Damaged {
                sha256: sha256.to_owned(),
            });
        }
        self.cache.put(&bytes)?;
        self.cache.open(sha256)
    }

    fn check(&self, sha256: &str) -> Result<BlobCheck> {
        Ok(match self.get(sha256) {
            Ok(None) => BlobCheck::Missing,
            Ok(Some(bytes)) => match muscle_protocol::sha256_hex(&bytes) {
                found if found == sha256 => BlobCheck::Intact,
                found => BlobCheck::Damaged { found },
            },
            Err(e) => BlobCheck::Unreadable {
                error: e.to_string(),
            },
        })
    }

    fn list(&self) -> Result<Vec<String>> {
        let what = format!("listing s3://{}/sha256/", self.bucket);
        let listed = self
            .block(self.s3.list_with_delimiter(Some(&Key::from("sha256"))))
            .map_err(s3_error(what))?;
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_owned))
            .filter(|name| is_blob_name(name))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blobs round-trip through a real S3-compatible server that checks signatures.
    #[test]
    fn blobs_round_trip_through_s3_and_nothing_damaged_is_served() {
        let dir = std::env::temp_dir().join(format!("muscle-s3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server = muscle_e2e::S3Server::start(&dir, &["blobs"]).unwrap();
        let url = server.url("blobs");
        let open = |name: &str, secret: &str| {
            let credentials = AmazonS3Builder::new()
                .with_access_key_id(muscle_e2e::s3::ACCESS_KEY)
                .with_secret_access_key(secret);
            S3BlobStore::open_with(&url, &dir.join(name), credentials).unwrap()
        };
        let secret = muscle_e2e::s3::SECRET_KEY;
        let first = open("first", secret);
        let bytes = b"an aarch64 binary, say".repeat(1000);
        let (sha256, put) = first.put(&bytes).unwrap();
        assert_eq!(put, BlobPut::Stored);
        assert_eq!(first.put(&bytes).unwrap().1, BlobPut::AlreadyThere);
        assert_eq!(first.list().unwrap(), std::slice::from_ref(&sha256));
        assert_eq!(first.check(&sha256).unwrap(), BlobCheck::Intact);

        // Another replica, nothing of its own: it fetches, checks and serves the same bytes.
        let second = open("second", secret);
        let mut served = Vec::new();
        let mut blob = second.open(&sha256).unwrap().expect("in the bucket");
        std::io::Read::read_to_end(&mut blob.file, &mut served).unwrap();
        assert_eq!(served, bytes);
        assert!(second.open(&"0".repeat(64)).unwrap().is_none());
        assert!(second.open("../../etc/passwd").unwrap().is_none());

        // Damaged in the bucket: found by check, never served, repaired by a put.
        let object = server.root.join("blobs/sha256").join(&sha256);
        std::fs::write(&object, b"not what was published").unwrap();
        assert!(matches!(
            first.check(&sha256).unwrap(),
            BlobCheck::Damaged { .. }
        ));
        let third = open("third", secret);
        assert!(matches!(
            third.open(&sha256),
            Err(StoreError::Damaged { .. })
        ));
        assert_eq!(first.put(&bytes).unwrap().1, BlobPut::Repaired);
        assert_eq!(third.check(&sha256).unwrap(), BlobCheck::Intact);

        // The server checks signatures: a wrong secret is refused, and said.
        let impostor = open("impostor", "wrong");
        let e = impostor.put(b"x").unwrap_err().to_string();
        assert!(e.contains("s3://blobs/sha256/") && e.contains("403"), "{e}");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
