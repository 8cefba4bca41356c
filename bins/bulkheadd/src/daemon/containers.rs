//! Containers in a running sandbox: create (root file system, volumes, the agent's
//! create), start, exec, signals, pause, update, delete, stdio.

use super::*;

/// Carry the spec's host bind mounts into the guest: each source is bind-mounted into
/// the container's directory in the shared directory (`<cdir>/mounts/<n>`) and the spec
/// is rewritten to bind it from there. Sources under /proc, /sys and /dev name the
/// guest's own and are left alone.
pub(super) fn share_bind_mounts(
    spec: &mut serde_json::Value,
    cdir: &Path,
    guest_cdir: &str,
    userns: Option<std::os::fd::BorrowedFd>,
) -> Result<(), Error> {
    let Some(list) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
        return Ok(());
    };
    for (n, m) in list.iter_mut().enumerate() {
        let opts: Vec<&str> = m
            .get("options")
            .and_then(|o| o.as_array())
            .map(|o| o.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let is_bind = m.get("type").and_then(|t| t.as_str()) == Some("bind")
            || opts.iter().any(|o| *o == "bind" || *o == "rbind");
        if !is_bind {
            continue;
        }
        let src = m
            .get("source")
            .and_then(|s| s.as_str())
            .ok_or_else(|| Error::InvalidArgument(format!("bind mount {n} has no source")))?
            .to_string();
        let src_path = Path::new(&src);
        if !src_path.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "bind mount source {src:?} is not an absolute path"
            )));
        }
        if ["/proc", "/sys", "/dev"]
            .iter()
            .any(|p| src_path.starts_with(p))
        {
            continue;
        }
        let meta = std::fs::metadata(src_path)
            .map_err(|e| Error::InvalidArgument(format!("bind mount source {src}: {e}")))?;
        // `cdir` is in the sandbox's host-only staging directory: nothing here can have
        // been planted. A file mount point is still opened as the file it must be, and
        // never truncated.
        let target = cdir.join("mounts").join(n.to_string());
        std::fs::create_dir_all(cdir.join("mounts")).map_err(io_err("cannot create mounts"))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map(drop)
        }
        .map_err(io_err("cannot create a mount point"))?;
        mounts::share(src_path, &target, userns)
            .map_err(|e| Error::Failed(format!("cannot share bind mount source {src}: {e}")))?;
        m["source"] = serde_json::Value::String(format!("{guest_cdir}/mounts/{n}"));
    }
    Ok(())
}

impl Daemon {
    pub(super) fn running(&self, id: &str) -> Result<Arc<Sandbox>, Error> {
        let sb = self.get(id)?;
        let state = sb.snapshot().state;
        if state != SandboxState::Running {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id} is {state}"
            )));
        }
        Ok(sb)
    }

    pub(super) fn container_state(sb: &Sandbox, cid: &str) -> Result<ContainerState, Error> {
        sb.snapshot()
            .container(cid)
            .map(|c| c.state)
            .ok_or_else(|| Error::NotFound(format!("no container {cid:?} in sandbox {}", sb.id)))
    }

    pub async fn create_container(
        self: &Arc<Self>,
        sid: &str,
        n: NewContainer,
    ) -> Result<u32, Error> {
        let NewContainer {
            id: cid,
            spec_json,
            rootfs,
            options:
                ContainerOptions {
                    stdin,
                    terminal,
                    overlay,
                    rootfs_overlay,
                },
        } = n;
        let layers = rootfs_overlay
            .map(|o| mounts::SnapshotOverlay::parse(&o))
            .transpose()
            .map_err(|e| Error::InvalidArgument(format!("rootfs_overlay: {e}")))?;
        let sb = self.running(sid)?;
        valid_id(&cid).map_err(Error::InvalidArgument)?;
        check_json_size("spec", &spec_json)?;
        let mut spec: serde_json::Value = serde_json::from_str(&spec_json)
            .map_err(|e| Error::InvalidArgument(format!("spec is not valid JSON: {e}")))?;
        if !spec.is_object() || !spec.get("process").is_some_and(|p| p.is_object()) {
            return Err(Error::InvalidArgument(
                "spec must be an OCI runtime spec object with a process".into(),
            ));
        }
        if let Some(t) = terminal {
            spec["process"]["terminal"] = serde_json::Value::Bool(t);
        }
        // Hooks name host binaries and run on the host (the OCI CLI runs them): the guest
        // could not run them, and must not be asked to.
        if let Some(o) = spec.as_object_mut() {
            o.remove("hooks");
        }
        let src = PathBuf::from(&rootfs);
        match &layers {
            Some(_) if !rootfs.is_empty() || overlay => {
                return Err(Error::InvalidArgument(
                    "give a rootfs directory or rootfs_overlay layers, not both".into(),
                ))
            }
            Some(l) => l.check_dirs().map_err(Error::InvalidArgument)?,
            None if !src.is_absolute() || !src.is_dir() => {
                return Err(Error::InvalidArgument(format!(
                    "rootfs {rootfs:?} is not an existing directory (absolute path)"
                )))
            }
            None => {}
        }
        let mount = {
            let mut r = sb.rec.lock().expect("rec lock");
            if r.container(&cid).is_some() {
                return Err(Error::AlreadyExists(format!(
                    "container {cid:?} exists in sandbox {sid}"
                )));
            }
            let mount = r.staging_dir().join(&cid).join("rootfs");
            r.containers.push(ContainerRec {
                id: cid.clone(),
                state: ContainerState::Creating,
                rootfs_mount: mount.clone(),
                exit_code: None,
                memory_limit_mib: memory::Limit::of(&spec["linux"]["resources"]).mib(),
            });
            mount
        };
        self.save(&sb);
        // The VM grows first, so the memory is there when the container starts.
        self.fit_memory(&sb, true).await;
        let result = async {
            let rec = sb.snapshot();
            if !rec.staging_dir().is_dir() {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {sid} was made by an older bulkheadd, whose shared directory \
                     the guest can write: recreate it to add containers"
                )));
            }
            let userns = jail::fs_userns_fd(&rec)
                .map_err(io_err("cannot reach virtiofsd's user namespace"))?;
            let ns = userns.as_ref().map(std::os::fd::AsFd::as_fd);
            let cdir = mount.parent().unwrap_or(&mount);
            std::fs::create_dir_all(&mount)
                .and_then(|()| jail::own_shared_dir(&rec, cdir))
                .map_err(io_err("cannot create the rootfs mount point"))?;
            if let Some(l) = &layers {
                let at = rec.run_dir.join("layers").join(&cid);
                let layer_ns = match ns {
                    Some(_) => Some(
                        jail::layer_userns(&rec)
                            .map_err(io_err("cannot make the writable layer's user namespace"))?,
                    ),
                    None => None,
                };
                let both = ns.zip(layer_ns.as_ref().map(std::os::fd::AsFd::as_fd));
                mounts::snapshot_overlay(l, &at, &mount, both)
                    .map_err(io_err("cannot mount the rootfs layers"))?;
            } else if overlay {
                // The writable layer lives outside the shared directory: the guest sees
                // only the merged view.
                let layer = rec.run_dir.join("layers").join(&cid);
                let owner = rec.jail_uid.unwrap_or(0);
                mounts::overlay(&src, &layer, &mount, ns.map(|n| (n, owner)))
                    .map_err(io_err("cannot mount the rootfs overlay"))?;
            } else {
                mounts::share(&src, &mount, ns).map_err(|e| match (ns, e.raw_os_error()) {
                    (Some(_), Some(libc::EINVAL)) => Error::FailedPrecondition(format!(
                        "cannot bind-mount the rootfs: this sandbox's virtiofsd runs in a \
                         user namespace, and {rootfs} is on a file system the kernel cannot \
                         idmap (an overlay mount?): {e}"
                    )),
                    _ => io_err("cannot bind-mount the rootfs")(e),
                })?;
            }
            share_bind_mounts(&mut spec, cdir, &format!("{GUEST_SHARED}/{cid}"), ns)?;
            let binds = cdir.join("mounts");
            if binds.exists() {
                jail::own_shared_dir(&rec, &binds).map_err(io_err("cannot create mounts"))?;
            }
            let req = CreateContainer {
                id: cid.clone(),
                spec_json: spec.to_string(),
                rootfs: Rootfs::Path(format!("{GUEST_SHARED}/{cid}/rootfs")),
                stdin,
            };
            sb.agent
                .call(Call::Change, move |c| c.create_container(req))
                .await
        }
        .await;
        match result {
            Ok(pid) => {
                self.update(
                    &sb,
                    Changed {
                        containers: true,
                        ..Default::default()
                    },
                    |r| {
                        if let Some(c) = r.container_mut(&cid) {
                            c.move_to(ContainerState::Created);
                        }
                    },
                )
                .await;
                Ok(pid)
            }
            Err(e) => {
                if let Some(dir) = mount.parent() {
                    let _ = mounts::unmount_and_remove(dir);
                }
                let _ =
                    mounts::unmount_and_remove(&sb.snapshot().run_dir.join("layers").join(&cid));
                sb.rec
                    .lock()
                    .expect("rec lock")
                    .containers
                    .retain(|c| c.id != cid);
                self.save(&sb);
                self.fit_memory(&sb, false).await;
                Err(e)
            }
        }
    }

    pub async fn start_container(self: &Arc<Self>, sid: &str, cid: String) -> Result<(), Error> {
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        let id = cid.clone();
        sb.agent.call(Call::Change, move |c| c.start(&id)).await?;
        self.set_container_state(&sb, &cid, ContainerState::Running, None)
            .await;
        self.watch_exit(&sb, cid);
        Ok(())
    }

    pub(super) async fn set_container_state(
        &self,
        sb: &Arc<Sandbox>,
        cid: &str,
        state: ContainerState,
        code: Option<i32>,
    ) {
        self.update(
            sb,
            Changed {
                containers: true,
                ..Default::default()
            },
            |r| {
                if let Some(c) = r.container_mut(cid) {
                    if c.move_to(state) && code.is_some() {
                        c.exit_code = code;
                    }
                }
            },
        )
        .await;
    }

    pub async fn exec(
        &self,
        sid: &str,
        cid: String,
        exec_id: String,
        process_json: String,
        stdin: bool,
    ) -> Result<u32, Error> {
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        valid_id(&exec_id).map_err(Error::InvalidArgument)?;
        check_json_size("process", &process_json)?;
        serde_json::from_str::<serde_json::Value>(&process_json)
            .ok()
            .filter(|v| v.is_object())
            .ok_or_else(|| {
                Error::InvalidArgument("process must be an OCI process JSON object".into())
            })?;
        let e = ExecProcess {
            id: cid,
            exec_id,
            process_json,
            stdin,
        };
        sb.agent.call(Call::Change, move |c| c.exec(e)).await
    }

    /// A plain agent call on a container of a running sandbox.
    pub async fn container_call<T: Send + 'static>(
        &self,
        sid: &str,
        cid: &str,
        kind: Call,
        f: impl FnOnce(
                &mut bulkhead_protocol::client::AgentClient<std::os::unix::net::UnixStream>,
            ) -> Result<T, bulkhead_protocol::client::ClientError>
            + Send
            + 'static,
    ) -> Result<T, Error> {
        let sb = self.running(sid)?;
        Self::container_state(&sb, cid)?;
        sb.agent.call(kind, f).await
    }

    pub async fn pause(&self, sid: &str, cid: String, pause: bool) -> Result<(), Error> {
        let id = cid.clone();
        self.container_call(sid, &cid, Call::Change, move |c| {
            c.expect_ok(&if pause {
                Request::Pause { id }
            } else {
                Request::Resume { id }
            })
        })
        .await?;
        let sb = self.get(sid)?;
        self.set_container_state(
            &sb,
            &cid,
            if pause {
                ContainerState::Paused
            } else {
                ContainerState::Running
            },
            None,
        )
        .await;
        Ok(())
    }

    pub async fn delete_container(&self, sid: &str, cid: String, force: bool) -> Result<(), Error> {
        let id = cid.clone();
        self.container_call(sid, &cid, Call::Change, move |c| c.delete(&id, force))
            .await?;
        let sb = self.get(sid)?;
        let mount = sb
            .snapshot()
            .container(&cid)
            .map(|c| c.rootfs_mount.clone());
        // The container's writable layer is the guest's to fill: removed off the
        // runtime's thread.
        let layer = sb.snapshot().run_dir.join("layers").join(&cid);
        tokio::task::spawn_blocking(move || {
            if let Some(m) = mount.as_ref().and_then(|m| m.parent()) {
                mounts::unmount_and_remove(m).map_err(io_err("cannot unmount the rootfs"))?;
            }
            let _ = mounts::unmount_and_remove(&layer);
            Ok::<(), Error>(())
        })
        .await
        .map_err(|e| Error::Failed(format!("container cleanup task: {e}")))??;
        self.update(
            &sb,
            Changed {
                containers: true,
                ..Default::default()
            },
            |r| r.containers.retain(|c| c.id != cid),
        )
        .await;
        self.fit_memory(&sb, false).await;
        Ok(())
    }

    /// See `Sandbox1.Update`. A raised memory limit grows the VM before the guest is
    /// told (and waits for it, bounded); a lowered one shrinks it after.
    pub async fn update_container(
        &self,
        sid: &str,
        cid: String,
        resources_json: String,
    ) -> Result<(), Error> {
        check_json_size("resources", &resources_json)?;
        let resources = serde_json::from_str::<serde_json::Value>(&resources_json)
            .ok()
            .filter(|v| v.is_object())
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "resources must be an OCI linux.resources JSON object".into(),
                )
            })?;
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        let old = sb
            .snapshot()
            .container(&cid)
            .and_then(|c| c.memory_limit_mib);
        let change = memory::LimitChange::of(old, memory::Limit::of(&resources));
        if let memory::LimitChange::Grow(new) = change {
            self.set_memory_limit(&sb, &cid, new, true).await;
        }
        let id = cid.clone();
        let told = self
            .container_call(sid, &cid, Call::Change, move |c| {
                c.expect_ok(&Request::Update { id, resources_json })
            })
            .await;
        match (&told, change) {
            // The guest kept the old limit: so does the record.
            (Err(_), memory::LimitChange::Grow(_)) => {
                self.set_memory_limit(&sb, &cid, old, false).await
            }
            (Ok(()), memory::LimitChange::Shrink(new)) => {
                self.set_memory_limit(&sb, &cid, new, false).await
            }
            _ => {}
        }
        told
    }

    /// Record a container's memory limit and fit the VM's hot-plug memory to it.
    pub(super) async fn set_memory_limit(
        &self,
        sb: &Arc<Sandbox>,
        cid: &str,
        to: Option<u64>,
        wait: bool,
    ) {
        self.update(sb, Changed::default(), |r| {
            if let Some(c) = r.container_mut(cid) {
                c.memory_limit_mib = to;
            }
        })
        .await;
        self.fit_memory(sb, wait).await;
    }

    pub async fn attach(
        &self,
        sid: &str,
        cid: String,
        exec_id: Option<String>,
        stream: &str,
    ) -> Result<std::os::unix::net::UnixStream, Error> {
        use bulkhead_protocol::StdioStream;
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        let which = match stream {
            "stdin" => StdioStream::Stdin,
            "stdout" => StdioStream::Stdout,
            "stderr" => StdioStream::Stderr,
            "wait" => return sb.agent.wait_stream(cid, exec_id).await,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "stream {other:?}: want stdin, stdout, stderr or wait"
                )))
            }
        };
        sb.agent.attach_stdio(cid, exec_id, which).await
    }
}
