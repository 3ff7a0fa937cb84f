package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/store"
)

func notFound(kind, name string) error {
	return apiError(http.StatusNotFound, api.CodeNotFound, "%s %q not found", kind, name)
}

// getOne answers GET of one stored object.
func (s *Server) getOne(w http.ResponseWriter, r *http.Request, kind, key, name string) error {
	kv, err := s.st.GetKV(r.Context(), key)
	if errors.Is(err, store.ErrNotFound) {
		return notFound(kind, name)
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.decorate(kind, kv.Key, kv.Value, kv.ModRevision))
	return nil
}

// --- networks ---

func (s *Server) listNetworks(w http.ResponseWriter, r *http.Request) error {
	return s.serveList(w, r, keyNetworks, api.KindNetwork, nil)
}

// getNetwork answers one network with the instances attached to it and its
// address usage.
func (s *Server) getNetwork(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	var n api.Network
	rev, err := s.st.Get(r.Context(), keyNetworks+name, &n)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("network", name)
	}
	if err != nil {
		return err
	}
	n.Revision = rev
	n.Status.Attached = s.regIndex.attachments(s.cache, name)
	n.Status.AddressesUsed = len(n.Status.Attached)
	n.Status.AddressesFree = max(0, api.UsableAddresses(n.Subnet)-n.Status.AddressesUsed)
	writeJSON(w, http.StatusOK, n)
	return nil
}

// firstVNI is the VXLAN id of the first overlay network.
const firstVNI = 4096

// ensureDefaultNetwork creates the default network on the first start.
func (s *Server) ensureDefaultNetwork(ctx context.Context) {
	spec := api.NetworkSpec{Name: api.DefaultNetwork, Subnet: api.DefaultNetworkSubnet}
	spec.Normalize()
	now := time.Now().UTC()
	n := api.Network{NetworkSpec: spec}
	n.CreatedAt, n.UpdatedAt = now, now
	if _, err := s.st.Put(ctx, keyNetworks+spec.Name, n, 0); err != nil && !errors.Is(err, store.ErrExists) {
		s.log.Warn("default network", "err", err)
	}
}

// createNetwork stores a network; names and subnets are unique. One index
// key, compared in the same transaction, serialises network creation so
// that two overlapping subnets can never both be accepted.
func (s *Server) createNetwork(w http.ResponseWriter, r *http.Request) error {
	var spec api.NetworkSpec
	if err := decode(r, &spec, "network", ""); err != nil {
		return err
	}
	spec.Normalize()
	if err := validated("network", spec.Validate()); err != nil {
		return err
	}
	ctx := r.Context()
	for {
		idxRev, err := s.st.Get(ctx, keyNetworksIndex, nil)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		kvs, _, err := s.st.List(ctx, keyNetworks)
		if err != nil {
			return err
		}
		maxVNI := 0
		for _, kv := range kvs {
			var n api.Network
			if json.Unmarshal(kv.Value, &n) != nil {
				continue
			}
			maxVNI = max(maxVNI, n.Status.VNI)
			if n.Name == spec.Name {
				return apiError(http.StatusConflict, api.CodeConflict, "network %q already exists", spec.Name)
			}
			if api.Overlaps(n.Subnet, spec.Subnet) {
				return invalid("network", api.FieldErrors{{Field: "subnet",
					Reason: fmt.Sprintf("%s overlaps network %q (%s)", spec.Subnet, n.Name, n.Subnet)}})
			}
		}
		now := time.Now().UTC()
		n := api.Network{NetworkSpec: spec}
		if spec.Driver == api.DriverOverlay {
			// VNIs are unique among networks: creation is serialised.
			n.Status.VNI = max(maxVNI+1, firstVNI)
		}
		n.CreatedAt, n.UpdatedAt = now, now
		rev, err := s.st.Txn(ctx,
			store.Write{Key: keyNetworksIndex, Value: map[string]string{"last": spec.Name}, Expect: idxRev},
			store.Write{Key: keyNetworks + spec.Name, Value: n, Expect: 0})
		if errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		n.Revision = rev
		writeJSON(w, http.StatusCreated, n)
		return nil
	}
}

func (s *Server) deleteNetwork(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	ctx := r.Context()
	rev, err := s.st.Get(ctx, keyNetworks+name, nil)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("network", name)
	}
	if err != nil {
		return err
	}
	kvs, _, err := s.st.List(ctx, keyServices)
	if err != nil {
		return err
	}
	var users []string
	for _, kv := range kvs {
		var svc api.Service
		if json.Unmarshal(kv.Value, &svc) == nil && slices.Contains(svc.Spec.Networks, name) {
			users = append(users, svc.Name)
		}
	}
	if len(users) > 0 {
		return apiError(http.StatusConflict, api.CodeConflict, "network %q is in use by services %v", name, users)
	}
	ikvs, _, err := s.st.List(ctx, keyInstances)
	if err != nil {
		return err
	}
	for _, kv := range ikvs {
		var in api.Instance
		if json.Unmarshal(kv.Value, &in) == nil {
			for _, v := range in.Status.VNICs {
				if v.Network == name {
					return apiError(http.StatusConflict, api.CodeConflict, "network %q is in use by instance %s", name, in.ID)
				}
			}
		}
	}
	if _, err := s.st.Delete(ctx, keyNetworks+name, rev); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// --- services ---

func (s *Server) listServices(w http.ResponseWriter, r *http.Request) error {
	return s.serveList(w, r, keyServices, api.KindService, nil)
}

func (s *Server) getService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	return s.getOne(w, r, api.KindService, keyServices+name, name)
}

// applyService creates a service or updates its spec. A spec equal to the
// stored one (after defaults) changes nothing; any other change bumps the
// generation.
func (s *Server) applyService(w http.ResponseWriter, r *http.Request) error {
	var spec api.ServiceSpec
	if err := decode(r, &spec, "service", "spec"); err != nil {
		return err
	}
	if name := r.PathValue("name"); name != "" && spec.Name == "" {
		spec.Name = name
	} else if name != "" && spec.Name != name {
		return invalid("service", api.FieldErrors{{Field: "spec.name", Reason: fmt.Sprintf("%q does not match the URL's %q", spec.Name, name)}})
	}
	spec.Normalize()
	if err := validated("service", spec.Validate()); err != nil {
		return err
	}
	ctx := r.Context()
	var fe api.FieldErrors
	for i, n := range spec.Networks {
		if n == api.NoNetwork {
			continue
		}
		if _, err := s.st.Get(ctx, keyNetworks+n, nil); errors.Is(err, store.ErrNotFound) {
			fe = append(fe, api.FieldError{Field: fmt.Sprintf("spec.networks[%d]", i), Reason: fmt.Sprintf("network %q does not exist", n)})
		} else if err != nil {
			return err
		}
	}
	if len(fe) > 0 {
		return invalid("service", fe)
	}
	for {
		var old api.Service
		rev, err := s.st.Get(ctx, keyServices+spec.Name, &old)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		now := time.Now().UTC()
		res := api.ApplyResult{Created: rev == 0}
		svc := api.Service{Name: spec.Name, Spec: spec, Generation: 1}
		svc.CreatedAt, svc.UpdatedAt = now, now
		if rev != 0 {
			res.Changed = specChanges(old.Spec, spec)
			if len(res.Changed) == 0 {
				old.Revision = rev
				res.Service = old
				writeJSON(w, http.StatusOK, res)
				return nil
			}
			svc = old
			svc.History = append(svc.History, api.SpecRevision{Generation: old.Generation, Spec: old.Spec, AppliedAt: old.UpdatedAt})
			if len(svc.History) > api.MaxHistory {
				svc.History = svc.History[len(svc.History)-api.MaxHistory:]
			}
			svc.Spec = spec
			svc.Generation = old.Generation + 1
			svc.UpdatedAt = now
			svc.Status.Rollout, svc.Status.Message = api.RolloutProgressing, ""
		}
		newRev, err := s.st.Put(ctx, keyServices+spec.Name, svc, rev)
		if errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		svc.Revision = newRev
		res.Service = svc
		status := http.StatusOK
		if res.Created {
			status = http.StatusCreated
		}
		s.log.Info("service applied", "service", spec.Name, "generation", svc.Generation, "created", res.Created, "changed", res.Changed)
		writeJSON(w, status, res)
		return nil
	}
}

// specChanges names the top-level spec fields that differ as stored: each
// field is compared in its JSON form within the whole spec, so that an empty
// list or map (which omitempty drops) equals an absent one.
func specChanges(a, b api.ServiceSpec) []string {
	wa, wb := wireFields(a), wireFields(b)
	var out []string
	t := reflect.TypeFor[api.ServiceSpec]()
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if !bytes.Equal(wa[name], wb[name]) {
			out = append(out, name)
		}
	}
	return out
}

// wireFields is a spec's JSON encoding split by top-level field.
func wireFields(s api.ServiceSpec) map[string]json.RawMessage {
	m := map[string]json.RawMessage{}
	if b, err := json.Marshal(s); err == nil {
		_ = json.Unmarshal(b, &m)
	}
	return m
}

func (s *Server) deleteService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	for {
		rev, err := s.st.Get(r.Context(), keyServices+name, nil)
		if errors.Is(err, store.ErrNotFound) {
			return notFound("service", name)
		}
		if err != nil {
			return err
		}
		// The controller writes the service's status concurrently: retry.
		if _, err := s.st.Delete(r.Context(), keyServices+name, rev); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

// --- instances ---

func (s *Server) listInstances(w http.ResponseWriter, r *http.Request) error {
	svc, node := r.URL.Query().Get("service"), r.URL.Query().Get("node")
	var keep func([]byte) bool
	if svc != "" || node != "" {
		keep = func(raw []byte) bool {
			var in struct{ Service, Node string }
			if json.Unmarshal(raw, &in) != nil {
				return false
			}
			return (svc == "" || in.Service == svc) && (node == "" || in.Node == node)
		}
	}
	return s.serveList(w, r, keyInstances, api.KindInstance, keep)
}

func (s *Server) getInstance(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	return s.getOne(w, r, api.KindInstance, keyInstances+id, id)
}

// updateInstance applies change to the stored instance, reading it again
// and retrying when someone else wrote it in between (agents write status,
// the controller and users write the rest).
func (s *Server) updateInstance(ctx context.Context, id string, change func(*api.Instance)) (api.Instance, error) {
	for {
		var in api.Instance
		rev, err := s.st.Get(ctx, keyInstances+id, &in)
		if errors.Is(err, store.ErrNotFound) {
			return api.Instance{}, notFound("instance", id)
		}
		if err != nil {
			return api.Instance{}, err
		}
		change(&in)
		in.UpdatedAt = time.Now().UTC()
		newRev, err := s.st.Put(ctx, keyInstances+id, in, rev)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return api.Instance{}, err
		}
		in.Revision = newRev
		return in, nil
	}
}

// putInstanceStatus records what an agent observed of an instance.
func (s *Server) putInstanceStatus(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	var st api.InstanceStatus
	if err := decode(r, &st, "instance status", "status"); err != nil {
		return err
	}
	if err := validated("instance status", st.Validate()); err != nil {
		return err
	}
	in, err := s.updateInstance(r.Context(), id, func(in *api.Instance) { in.Status = st })
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, in)
	return nil
}

// The registration handlers are in registry.go.
